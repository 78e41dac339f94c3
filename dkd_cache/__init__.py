"""dkd-cache: run the teacher once, distil many students from its cached logits (DKD, Zhao et al. 2022)."""

__version__ = "0.1.0"
FORMAT_VERSION = 1
