"""Builders of synthetic models: the offline tiny zoo (``--models tiny``, tests), offline tokenizers and
the real-size random-weight architectures of ``capvqa bench``. Nothing here is used by a real run."""
