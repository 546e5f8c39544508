"""Makes torchvision's pure-Python models importable with the CPU torch of the test environment.

torchvision 0.28's `_meta_registrations` registers meta kernels for its C++ ops (torchvision::nms ...),
which this torch build does not load: `import torchvision` raises "operator torchvision::nms does not
exist", and with it every transformers import that probes torchvision (CLIPModel, ViTModel ...). The
references that need torchvision (lpips' AlexNet/VGG, pytorch-fid's InceptionV3) use none of those ops,
so an empty stand-in for that one module is enough. Imported by conftest.py before anything else.
"""

from __future__ import annotations

import sys
import types


def install() -> None:
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
