"""How ``sbpet train`` trains a PET: our protocol (the default) or the released code's.

The released code (thunlp/stochastic-bridge-pet) trains few-shot runs for a fixed number of steps
(1000 at batch 2) at a constant learning rate (LoRA / adapters / BitFit 1e-4, prompt tuning 1e-3)
with AdamW weight decay 0.01, with dropout off (the model in eval mode), evaluates on the few-shot
validation split every 50 steps and tests the best checkpoint (ties to the lower validation loss);
prompt tuning uses 20 virtual tokens initialised from the [MASK] embedding, LoRA r 8 at scale 1.
Ours trains 10 epochs at 5e-3 with warm-up and linear decay, dropout on, and tests the last step.

:class:`Protocol` holds every part; :func:`resolve` builds one from a preset and any part set on
its own (``None`` = the preset's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = ["PROTOCOLS", "Protocol", "resolve", "PAPER_LR", "add_protocol_arguments", "protocol_from_args"]

PROTOCOLS = ("ours", "paper")
# The released code's constant learning rates; IA3 and prefix tuning are not in it and take those
# of their families (IA3 rescales like LoRA adapts; a prefix is a deep prompt).
PAPER_LR = {"lora": 1e-4, "ia3": 1e-4, "bitfit": 1e-4, "prompt": 1e-3, "prefix": 1e-3}


@dataclass(frozen=True)
class Protocol:
    """One training protocol. ``steps`` None: train ``epochs`` epochs; ``lr`` None: the
    preset's per-PET rate; ``eval_every`` None: test the last step, else evaluate on the
    validation split every that many steps (and at the last) and test the best."""

    name: str = "ours"
    epochs: float = 10.0
    steps: int | None = None
    batch_size: int = 8
    lr: float | None = 5e-3
    schedule: str = "linear"  # "linear": 10% warm-up then linear decay; "constant"
    weight_decay: float = 0.0
    dropout: bool = True
    eval_every: int | None = None
    prompt_init: str = "random"  # of prompt tuning's virtual tokens: "random" (peft's) or "mask"
    virtual_tokens: int = 10
    lora_alpha: int = 16  # LoRA r is 8: scale lora_alpha / r

    def learning_rate(self, pet: str) -> float:
        return PAPER_LR[pet] if self.lr is None else float(self.lr)

    def key(self) -> dict:
        """The parts that differ from our protocol: a run's key holds only these, so the runs made
        before protocols existed keep their names."""
        ours = asdict(OURS)
        return {k: v for k, v in asdict(self).items() if k != "name" and v != ours[k]}


OURS = Protocol()
PAPER = Protocol("paper", steps=1000, batch_size=2, lr=None, schedule="constant", weight_decay=0.01,
                 dropout=False, eval_every=50, prompt_init="mask", virtual_tokens=20, lora_alpha=8)
_PRESETS = {"ours": OURS, "paper": PAPER}


def resolve(name: str = "ours", **parts) -> Protocol:
    """The preset ``name`` with every part in ``parts`` that is not None set on its own (``epochs``
    without ``steps`` trains by epochs, whatever the preset's steps).

    Example:
        >>> resolve("paper", steps=200).steps, resolve("paper").learning_rate("prompt")
        (200, 0.001)
    """
    if name not in _PRESETS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}")
    chosen = {k: v for k, v in parts.items() if v is not None}
    unknown = set(chosen) - set(asdict(OURS))
    if unknown:
        raise TypeError(f"unknown protocol parts: {sorted(unknown)}")
    if "epochs" in chosen and "steps" not in chosen:  # epochs asked for on their own: train by epochs
        chosen["steps"] = None
    protocol = replace(_PRESETS[name], **chosen)
    if protocol.schedule not in ("linear", "constant"):
        raise ValueError(f"--schedule must be linear or constant, got {protocol.schedule!r}")
    if protocol.prompt_init not in ("random", "mask"):
        raise ValueError(f"--prompt-init must be random or mask, got {protocol.prompt_init!r}")
    for option, value in (("--steps", protocol.steps), ("--eval-every", protocol.eval_every),
                          ("--virtual-tokens", protocol.virtual_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    if protocol.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {protocol.weight_decay}")
    return protocol


def add_protocol_arguments(parser) -> None:
    """--protocol and its parts, each settable on its own (None: the preset's; sbpet.cli.protocol)."""
    parser.add_argument("--protocol", choices=("ours", "paper"), default="ours",
                        help="ours: --epochs epochs, warm-up and linear decay, dropout on, the last step tested; "
                        "paper: the released code's (1000 steps at batch 2, constant lr 1e-4, 1e-3 for prompt and "
                        "prefix tuning, weight decay 0.01, dropout off, the best of validation every 50 steps "
                        "tested, 20 virtual tokens from [MASK], LoRA scale 1)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps, in place of --epochs (default: the protocol's)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="evaluate on the validation split every N steps and test the best step "
                        "(default: the protocol's; ours tests the last step)")
    parser.add_argument("--schedule", choices=("linear", "constant"), default=None,
                        help="learning-rate schedule (default: the protocol's)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="AdamW weight decay (default: the protocol's)")
    parser.add_argument("--dropout", choices=("on", "off"), default=None, help="dropout while training "
                        "(default: the protocol's)")
    parser.add_argument("--prompt-init", choices=("random", "mask"), default=None,
                        help="prompt tuning's virtual tokens start as peft's random init or as [MASK] "
                        "(default: the protocol's)")
    parser.add_argument("--virtual-tokens", type=int, default=None,
                        help="virtual tokens of prompt and prefix tuning (default: the protocol's)")


def protocol_from_args(args) -> Protocol:
    """The protocol of a ``sbpet train`` command; fills ``args.epochs`` / ``batch_size`` / ``lr``
    from it where they were not given."""
    dropout = None if args.dropout is None else args.dropout == "on"
    protocol = resolve(args.protocol, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, steps=args.steps,
                       eval_every=args.eval_every, schedule=args.schedule, weight_decay=args.weight_decay,
                       dropout=dropout, prompt_init=args.prompt_init, virtual_tokens=args.virtual_tokens)
    args.epochs, args.batch_size, args.lr = protocol.epochs, protocol.batch_size, protocol.learning_rate(args.pet)
    return protocol

