"""The names of the instance encoders and norm layers, without torch.

Methods declare their config choices (``encoder``, ``norm``) when their plugin
registers, and registering a plugin never imports torch; the encoders
themselves (:mod:`milbench.models.encoders`) need torch. Both read the names
from here, so the two can never disagree and neither imports the other.
"""

from __future__ import annotations

#: Instance encoders, in the order :mod:`milbench.models.encoders` registers them.
ENCODERS = ("lenet", "cnn", "resnet18")
#: Norm layers an encoder can use (``batch`` only where a bag is encoded whole).
NORMS = ("none", "group", "frozen", "batch")
