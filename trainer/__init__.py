"""The trainer: read a chest X-ray dataset, train with the seed's recipe, evaluate, publish a model bundle.

Importing this package does not import TensorFlow; `trainer.cli` sets TensorFlow's log level first.
"""
