"""tokenmill: the Phi-4 training recipe as Kubernetes custom resources."""

__version__ = "0.1.0"
