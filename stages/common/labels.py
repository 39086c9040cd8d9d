"""The label convention shared by tokenization, training and evaluation.

tokenize_data labels prompt tokens IGNORE_INDEX so the loss covers the completion only; training scores only
labelled positions; evaluation's completion losses skip the same positions. -100 is the value PyTorch's
cross-entropy and transformers' collators ignore by default.
"""

IGNORE_INDEX = -100
