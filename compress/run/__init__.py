"""Run: the commands that drive the stages (apply's pipeline, batch, verify, inspect, analyze) and OUT."""
