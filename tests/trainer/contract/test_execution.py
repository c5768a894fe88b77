"""The environment contract: what a dispatcher sets is exactly what the trainer reads back."""

from datetime import UTC, datetime

from trainer.contract.execution import CLOUD_RUN_TASK_ATTEMPT, OWN_FIELDS, ExecutionEnv


def test_round_trip_through_the_environment() -> None:
    env = ExecutionEnv(
        run_id="run_abc",
        callback_url="http://127.0.0.1:8000/api/v1/runs/run_abc/events",
        callback_token="tok.sig",
        artifact_uri="gs://bucket/runs/run_abc",
        checkpoint_uri="gs://bucket/runs/run_abc/checkpoints",
        deadline=datetime(2026, 11, 28, 12, 0, tzinfo=UTC),
        segment=2,
        segment_max_steps=5,
        spool_dir="/tmp/spool",
    )
    environ = env.as_environ()
    assert set(environ) == {"TUNEPLANE_" + name.upper() for name in OWN_FIELDS}
    assert environ["TUNEPLANE_CALLBACK_TOKEN"] == "tok.sig"
    back = ExecutionEnv.from_environ({**environ, CLOUD_RUN_TASK_ATTEMPT: "1"})
    assert back.model_dump(exclude={"task_attempt"}) == env.model_dump(exclude={"task_attempt"})
    assert back.task_attempt == 1


def test_a_run_by_hand_has_nothing_set() -> None:
    env = ExecutionEnv.from_environ({"PATH": "/usr/bin", "TUNEPLANE_RUN_ID": ""})
    assert env.run_id is None and env.callback_url is None and env.deadline is None
    assert env.as_environ() == {"TUNEPLANE_SEGMENT": "0"}
