"""Distill: the original model teaches the rewritten one (and the int8 QAT fine-tune)."""
