"""Growing a model's temporal compression by one level on top of a trained one
(../shared/docs/progressive-growing.md).

A config with one level more (`CDTConfig.grown`) builds a model holding every module of
the one below under the same names, plus the top level: the encoder's `TimeLevel`
(`encoder.levels.<n>`) and the condition adapter's `TimeUpsample` (`adapter.time_up.<n>`).
The KL head keeps its name `encoder.head`: it now reads the top level's features and
starts from the head below when the widths agree. `load_below` starts a grown model from
the weights below; `top_level` names what the first training stage trains while the rest
stays frozen.
"""

from __future__ import annotations

import torch

from .tokenizer import Tokenizer

HEAD = "encoder.head."


def top_level(model: Tokenizer) -> tuple[str, ...]:
    """Name prefixes of the modules new in a grown model: its top level, its time
    upsample, and the KL head that reads them."""
    n = len(model.config.levels)
    if n == 0:
        raise ValueError("a model without levels has no grown level")
    return f"encoder.levels.{n - 1}.", f"adapter.time_up.{n - 1}.", HEAD


def load_below(model: Tokenizer, below: dict[str, torch.Tensor]) -> list[str]:
    """Load the weights of the model `model` was grown from (config `model.config.below()`)
    into it; returns the names of its weights that did not come from them (the top
    level's, and the head's if its input width changed). ValueError if `below` is not the
    state of such a model."""
    own = model.state_dict()
    new = top_level(model)
    fitting = {k: v for k, v in below.items() if k in own and own[k].shape == v.shape}
    misfits = sorted(k for k in below if k not in fitting and not k.startswith(HEAD))
    if misfits:
        raise ValueError(f"weights that the grown model has no place for: {misfits[:3]}")
    missing = sorted(k for k in own if k not in fitting)
    stray = [k for k in missing if not k.startswith(new)]
    if stray:
        raise ValueError(f"weights below lack {stray[:3]}: they are not the model this one was grown from")
    model.load_state_dict(fitting, strict=False)
    return missing


def freeze_below(model: Tokenizer) -> list[str]:
    """Stop the gradients of every weight but the top level's (`top_level`); returns the
    names of the parameters left trainable."""
    new = top_level(model)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(new))
        if param.requires_grad:
            trainable.append(name)
    return trainable
