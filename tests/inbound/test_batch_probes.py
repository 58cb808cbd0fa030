

@pytest.mark.parametrize("ignore_soft", ["", "1"])
def test_a_batch_past_its_time_limit_loses_nothing(
    committed_db: Engine, committed_url: str, broker_url: str, tmp_path: Path, ignore_soft: str
) -> None:
    """Rule: a batch stopped by its soft or hard time limit leaves every message to its
    own run: all applied, none left on the broker."""
    from tests.inbound.test_inbound_batches import left_on_broker

    env = broker_environment(
        committed_url, broker_url, tmp_path / "var", PROBE_SLOW_SECONDS="12",
        COMMS_TASK_SOFT_TIME_LIMIT="3", COMMS_TASK_TIME_LIMIT="5",
        PROBE_IGNORE_SOFT_LIMIT=ignore_soft,
    )
    producer = other_service(broker_url)
    events = [f.therapist_upserted(4800 + n) for n in range(10)]
    events.insert(3, f.therapist_upserted(4899, last_name=SLOW_BATCH_NAME))
    worker = WorkerProcess(env, tmp_path / "worker.log", "--concurrency=1", *HOOK)
    try:
        producer.send_task(THERAPIST, kwargs={"event": f.therapist_upserted(4898, last_name=SLOW_BATCH_NAME)})
        time.sleep(1)
        for event in events:
            producer.send_task(THERAPIST, kwargs={"event": event})
        worker.wait_for(lambda: len(therapists(committed_db)) == len(events) + 1, 90)
        time.sleep(3)
        worker.check_alive()
    finally:
        producer.close()
        worker.stop()
    assert left_on_broker(broker_url) == 0
