"""What the fork server of compress/run/forkrun.py imports once, so that each forked `compress` run starts with it."""
import onnx  # noqa: F401
import onnxruntime  # noqa: F401
import timm  # noqa: F401
import torch  # noqa: F401

import compress.measure.analysis  # noqa: F401 - what the commands import lazily
import compress.run.batch  # noqa: F401
import compress.run.batch_merge  # noqa: F401
import compress.cli  # noqa: F401
import compress.run.inspect  # noqa: F401
import compress.run.pipeline  # noqa: F401
import compress.planner.search  # noqa: F401
import compress.run.verify  # noqa: F401
