"""The demo's words: first and last names, titles, address patterns, phone prefixes,
complaints, availability and experience phrases. Data only."""

from __future__ import annotations

FEMALE_FIRST_NAMES = (
    "Anna", "Bärbel", "Birgit", "Charlotte", "Claudia", "Dörte", "Henrike", "Jana",
    "Julia", "Katharina", "Lena", "Miriam", "Sabine", "Sophie", "Susanne", "Ulrike",
)  # fmt: skip


MALE_FIRST_NAMES = (
    "Andreas", "Björn", "Florian", "Günter", "Jörg", "Jürgen", "Lukas", "Matthias",
    "Michael", "Moritz", "Sebastian", "Stefan", "Thomas", "Tobias",
)  # fmt: skip


LAST_NAMES = (
    "Bauer", "Becker", "Böhm", "Brandt", "Braun", "Fischer", "Förster", "Groß", "Haas",
    "Hartmann", "Hoffmann", "Jäger", "Klein", "Koch", "Köhler", "Krause", "Krüger", "Lange",
    "Lehmann", "Meyer", "Müller", "Müller-Lüdenscheidt", "Neumann", "Richter", "Schäfer",
    "Schmidt", "Schneider", "Schröder", "Schulz", "Schwarz", "Sommer", "Vogel", "von Arnim",
    "Wagner", "Weber", "Weiß", "Werner", "Wolf", "Zimmermann",
)  # fmt: skip


# (title, weight): most therapists carry none, psychologists often "Dipl.-Psych.".
TITLES: tuple[tuple[str | None, int], ...] = (
    (None, 50),
    ("Dipl.-Psych.", 25),
    ("Dr.", 15),
    ("Dr. med.", 6),
    ("Prof. Dr.", 2),
)


# "{first}", "{initial}", "{last}": ascii forms of the names.
EMAIL_PATTERNS = (
    "{initial}.{last}@praxis-{last}.de",
    "kontakt@psychotherapie-{last}.de",
    "praxis@{last}-psychotherapie.de",
    "{first}.{last}@t-online.de",
    "praxis.{last}@gmx.de",
    "{initial}{last}@web.de",
)


TRANSLITERATION = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss", " ": "-"})


# Area codes of German cities (without the leading zero) and of mobile networks.
LANDLINE_AREA_CODES = ("30", "40", "89", "221", "69", "711", "211", "341", "351", "511", "911")


MOBILE_PREFIXES = ("151", "160", "170", "176")


# Diagnosis (ICD-10) -> current complaints that fit it.
COMPLAINTS_BY_DIAGNOSIS: dict[str, tuple[str, ...]] = {
    "F32.1 Mittelgradige depressive Episode": (
        "Anhaltende Niedergeschlagenheit und Antriebslosigkeit, der Alltag fällt zunehmend "
        "schwer. Schläft schlecht und zieht sich von Freunden zurück.",
        "Fühlt sich seit Monaten erschöpft und freudlos. Die Arbeit ist nur noch mit großer "
        "Mühe zu schaffen.",
    ),
    "F33.1 Rezidivierende depressive Störung, gegenwärtig mittelgradige Episode": (
        "Erneute depressive Phase mit Grübeln, Konzentrationsproblemen und frühem Erwachen. "
        "Wünscht sich Unterstützung, um Rückfällen besser vorzubeugen.",
        "Wiederkehrende Phasen gedrückter Stimmung, aktuell mit deutlichem Interessenverlust.",
    ),
    "F41.1 Generalisierte Angststörung": (
        "Ständige Sorgen um Gesundheit, Familie und Arbeit, die sich kaum abstellen lassen. "
        "Dazu Anspannung, Unruhe und Einschlafprobleme.",
        "Anhaltende innere Unruhe und Sorgen, die den Alltag bestimmen.",
    ),
    "F41.0 Panikstörung": (
        "Wiederholte Panikattacken mit Herzrasen und Atemnot, vor allem in Bus und Bahn. "
        "Vermeidet inzwischen längere Fahrten.",
    ),
    "F40.1 Soziale Phobie": (
        "Starke Angst, in Gesprächen und Besprechungen negativ aufzufallen. Meidet deshalb "
        "Veranstaltungen und Telefonate.",
        "Große Anspannung in sozialen Situationen, besonders bei Referaten im Studium.",
    ),
    "F43.1 Posttraumatische Belastungsstörung": (
        "Belastende Erinnerungen und Albträume nach einem Verkehrsunfall. Schreckhaftigkeit "
        "und Schlafstörungen erschweren den Alltag.",
        "Wiederkehrende Erinnerungen an ein belastendes Ereignis, dazu Schlafprobleme und "
        "Reizbarkeit.",
    ),
    "F43.2 Anpassungsstörung": (
        "Nach einer Trennung anhaltend traurig und überfordert. Sucht Unterstützung, um wieder "
        "Stabilität zu finden.",
        "Seit dem Verlust des Arbeitsplatzes starke Zukunftsängste und Schlafprobleme.",
    ),
    "F42.2 Zwangsgedanken und -handlungen, gemischt": (
        "Zeitaufwendige Kontroll- und Waschrituale, die mehrere Stunden am Tag in Anspruch "
        "nehmen. Leidet zusätzlich unter aufdringlichen Gedanken.",
    ),
    "F50.2 Bulimia nervosa": (
        "Wiederkehrende Essanfälle mit anschließendem Erbrechen. Möchte das eigene "
        "Essverhalten mit therapeutischer Hilfe stabilisieren.",
    ),
}


TIME_AVAILABILITY = (
    "Montags und mittwochs ab 16 Uhr",
    "Vormittags flexibel",
    "Dienstags und donnerstags ganztägig",
    "Nur nach 17 Uhr (Vollzeitstelle)",
    "Flexibel, außer freitags",
    "Mittwochs und freitags vormittags",
    "Werktags zwischen 12 und 14 Uhr",
    "Nach Absprache, Schichtdienst im Wechsel",
)


SEASONS = ("Frühjahr", "Sommer", "Herbst", "Winter")


# "{yN}" is the year N years before now; "\u2013" is an en dash.
THERAPY_EXPERIENCE = (
    "Keine Vorerfahrung",
    "Keine Vorerfahrung",
    "Verhaltenstherapie {y7}\u2013{y6} (25 Sitzungen)",
    "Tiefenpsychologisch fundierte Psychotherapie {y5}\u2013{y3}",
    "Stationärer Aufenthalt in einer psychosomatischen Klinik {y2} (8 Wochen)",
    "Psychologische Beratungsstelle der Hochschule {y1} (5 Gespräche)",
    "Probatorische Sitzungen {y2}, Therapie nicht begonnen",
)
