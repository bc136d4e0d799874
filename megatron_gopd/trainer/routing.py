"""Which teacher, which reference and which lambda each prompt domain gets.

Three flags describe the routing, each a list of ``VALUE`` or ``DOMAIN=VALUE`` items (``VALUE``
alone means the ``default`` domain, i.e. every domain not named):

    --teacher-load math=/ckpt/math-teacher --teacher-load code=/ckpt/code-teacher
    --ref-load /ckpt/base                       (default: the student's initial checkpoint)
    --gopd-lambda math=1.25                     (default: 1.0, plain OPD)

:class:`Routing` holds the three maps as the flags give them (checked without touching a file);
:meth:`Routing.resolve` turns them, once the prompt data is read, into a :class:`DomainRouting`:
``domain -> DomainRoute(teacher key, reference key or None, lambda)``, the one object every stage
looks up. A domain with lambda == 1 has no reference: its reference term is zero and its reference
forward pass is never run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial

from megatron_gopd.flags import flag
from megatron_gopd.trainer.data import DEFAULT_DOMAIN
from megatron_gopd.utils import GopdError

__all__ = ["DomainRoute", "DomainRouting", "Routing", "parse_domain_map"]


def parse_domain_map(items: Iterable[str], what: str, convert=str) -> dict[str, object]:
    """``["PATH"]`` -> ``{"default": PATH}``; ``["a=P1", "b=P2"]`` -> ``{"a": P1, "b": P2}``."""
    out: dict[str, object] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep:
            key, value = DEFAULT_DOMAIN, str(item)
        key = key.strip()
        if not key or not value:
            raise GopdError(f"{what}: cannot parse {item!r} (expected VALUE or DOMAIN=VALUE)")
        if key in out:
            raise GopdError(f"{what}: domain {key!r} given twice")
        try:
            out[key] = convert(value)
        except ValueError:
            raise GopdError(f"{what}: {value!r} is not a valid value for domain {key!r}") from None
    return out


def _lambda(value: str) -> float:
    return float(value)


@dataclass(frozen=True)
class Routing:
    """The routing flags, parsed: ``domain -> checkpoint`` (teachers, references) and
    ``domain -> lambda``; the key ``default`` covers every domain not named."""

    FLAG_GROUP = "models"

    teachers: dict[str, str] = flag(
        name="--teacher-load",
        action="append",
        metavar="[DOMAIN=]PATH",
        parse=partial(parse_domain_map, what="--teacher-load"),
        default_factory=dict,
        default_help="required",
        help="teacher checkpoint; repeat as DOMAIN=PATH for multi-teacher runs",
    )
    references: dict[str, str] = flag(
        name="--ref-load",
        action="append",
        metavar="[DOMAIN=]PATH",
        parse=partial(parse_domain_map, what="--ref-load"),
        default_factory=dict,
        default_help="the student's initial checkpoint",
        help="reference pi_ref; the teacher's pre-RL base gives reward correction; DOMAIN=PATH "
        "per domain",
    )
    lambdas: dict[str, float] = flag(
        name="--gopd-lambda",
        action="append",
        metavar="[DOMAIN=]LAMBDA",
        parse=partial(parse_domain_map, what="--gopd-lambda", convert=_lambda),
        default_factory=dict,
        default_help="1.0 for every domain",
        group="G-OPD",
        help="reward scale lambda: 1 = OPD, >1 = ExOPD (1.25 in the paper); DOMAIN=VALUE per "
        "domain",
    )

    def check(self) -> None:
        """What can be checked without files: lambdas are finite and >= 0, named domains exist."""
        if not self.teachers:
            raise GopdError("--teacher-load is required (DOMAIN=PATH per domain for multi-teacher)")
        for d, lam in self.lambdas.items():
            if not (math.isfinite(lam) and lam >= 0.0):  # NaN and inf too
                raise GopdError(
                    f"--gopd-lambda {d}={lam}: lambda must be finite and >= 0 (1 = OPD, >1 = ExOPD)"
                )
        for d in self.lambdas:
            if (
                d != DEFAULT_DOMAIN
                and d not in self.teachers
                and DEFAULT_DOMAIN not in self.teachers
            ):
                raise GopdError(f"--gopd-lambda names domain {d!r}, which has no teacher")

    @property
    def teacher_domains(self) -> set[str] | None:
        """The domains that have a teacher; None when a default teacher takes any domain."""
        return None if DEFAULT_DOMAIN in self.teachers else set(self.teachers)

    def lam(self, domain: str) -> float:
        return float(self.lambdas.get(domain, self.lambdas.get(DEFAULT_DOMAIN, 1.0)))

    def resolve(self, domains: Iterable[str]) -> DomainRouting:
        """The route of each domain in ``domains`` (raises, naming the domain, when one has no
        teacher, or needs a reference and has none)."""
        routes = {}
        for d in sorted(set(domains)):
            if d in self.teachers:
                teacher = d
            elif DEFAULT_DOMAIN in self.teachers:
                teacher = DEFAULT_DOMAIN
            else:
                raise GopdError(
                    f"domain {d!r} has no teacher (teachers: {', '.join(sorted(self.teachers))}); "
                    f"add --teacher-load {d}=PATH"
                )
            lam = self.lam(d)
            reference = None
            if lam != 1.0:
                reference = d if d in self.references else DEFAULT_DOMAIN
                if reference not in self.references:
                    raise GopdError(
                        f"domain {d!r} has lambda {lam} != 1 and needs a reference: give --ref-load "
                        f"(default: the student's initial checkpoint)"
                    )
            routes[d] = DomainRoute(domain=d, teacher=teacher, reference=reference, lam=lam)
        return DomainRouting(routes)


@dataclass(frozen=True)
class DomainRoute:
    """Where one domain's samples go: its teacher's key, its reference's key (None when lambda is
    1, so that no reference is built or run for it) and its lambda."""

    domain: str
    teacher: str
    reference: str | None
    lam: float


@dataclass(frozen=True)
class DomainRouting:
    """Every domain of the run (training and evaluation prompts) and its :class:`DomainRoute`,
    built once before any model exists; the stages only look routes up."""

    routes: Mapping[str, DomainRoute] = field(default_factory=dict)

    def __getitem__(self, domain: str) -> DomainRoute:
        try:
            return self.routes[domain]
        except KeyError:
            raise GopdError(f"domain {domain!r} is not routed (not in the prompt data)") from None

    @property
    def domains(self) -> list[str]:
        return sorted(self.routes)

    @property
    def teacher_keys(self) -> list[str]:
        return sorted({r.teacher for r in self.routes.values()})

    @property
    def reference_keys(self) -> list[str]:
        return sorted({r.reference for r in self.routes.values() if r.reference is not None})

    @property
    def needs_reference(self) -> bool:
        """lambda == 1 is plain OPD: the reference term vanishes and is never computed."""
        return any(r.reference is not None for r in self.routes.values())
