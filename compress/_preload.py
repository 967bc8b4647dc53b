"""What the fork server of compress/forkrun.py imports once, so that each forked `compress` run starts with it."""
import onnx  # noqa: F401
import onnxruntime  # noqa: F401
import timm  # noqa: F401
import torch  # noqa: F401

import compress.analysis  # noqa: F401 - what the commands import lazily
import compress.batch  # noqa: F401
import compress.batch_merge  # noqa: F401
import compress.cli  # noqa: F401
import compress.inspect  # noqa: F401
import compress.pipeline  # noqa: F401
import compress.plan  # noqa: F401
import compress.verify  # noqa: F401
