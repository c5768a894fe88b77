"""What the api does, independent of HTTP: used by the JSON routes, the dashboard and the worker.
Each public function that writes commits its own unit of work (the rule in api/db.py)."""
