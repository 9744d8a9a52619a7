"""Serving: the HTTP API (api.py) over a ranker (ranker.py) and a cold-start encoder (encoding.py),
run as a Ray Serve application (app.py) or in one plain process."""
