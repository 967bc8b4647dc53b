"""A run never reaches the network: onnxruntime's telemetry is off before onnxruntime is first imported.

onnxruntime >= 1.2x on Linux starts a 1DS telemetry client with its first environment: it writes `$TMPDIR/.ses`
and a device id under `~/.cache/Microsoft`, and may upload events (DNS lookups that air-gapped sites see blocked).
`disable_telemetry_events()` called after import is too late for the files; the environment variable read at
start-up is not. Imported by compress/__init__.py, so every path into onnxruntime through compress passes here,
and the children compress starts (latency runs, older runtimes) inherit it.
"""
import os

os.environ["ORT_DISABLE_TELEMETRY"] = "1"
