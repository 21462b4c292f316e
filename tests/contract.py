"""The public JSON contract of a run, written out by hand so that tests check the code against it."""

CONTRACT_KEYS = [
    "id",
    "machine",
    "test_dir",
    "test_dir_hash",
    "status",
    "exit_code",
    "started_at",
    "ended_at",
    "artifacts_path",
    "logs_path",
    "error_code",
    "error_msg",
]
