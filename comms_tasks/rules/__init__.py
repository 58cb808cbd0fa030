"""The pure rules, no database: batching (contactability, batch order, local days),
slots (availability -> free slots). May import models' enums and contracts only."""
