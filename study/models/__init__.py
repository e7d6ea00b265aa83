"""Recurrent models: the h-detach LSTM and the sequence classifier built on it."""

from study.models.classifier import SequenceClassifier
from study.models.detach_lstm import DetachLSTM

__all__ = ["DetachLSTM", "SequenceClassifier"]
