"""Bridges from a relay to the tracking tools teams already use: ``fedrelay bridge mlflow``.

``feed`` follows runs on a relay (gap-free, resumable from a cursor kept elsewhere),
``mlflow_map`` turns events into MLflow writes (pure), ``mlflow_sink`` applies them with retries,
``cli`` wires the three together.
"""
