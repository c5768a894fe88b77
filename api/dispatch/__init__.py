"""Dispatchers start trainer executions: `LocalDispatcher` (subprocesses, the embedded default)
and `CloudRunDispatcher` (Cloud Run Jobs). `make_dispatcher` picks one by settings."""
