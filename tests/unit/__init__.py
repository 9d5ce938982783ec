"""Unit tests: the ctm_core library on its own (functions, nets, formats); no stage, server or pipeline."""
