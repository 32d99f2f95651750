"""Training of the embedded models on scikit-learn's handwritten digits (``python -m training.digits``)."""
