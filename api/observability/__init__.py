"""What an operator scrapes and reads: Prometheus metrics (metrics.py) and structured logs
(logs.py)."""
