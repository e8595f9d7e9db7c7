"""yolodistill: knowledge distillation for YOLO detectors (teacher -> student), with our own training loop."""

__version__ = "0.1.0"
