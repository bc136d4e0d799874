"""Which teacher, which reference and which lambda each prompt domain gets.

Five flags describe the routing, each a list of ``VALUE`` or ``DOMAIN=VALUE`` items (``VALUE``
alone means the ``default`` domain, i.e. every domain not named):

    --teacher-load math=/ckpt/math-teacher --teacher-load code=/ckpt/code-teacher
    --teacher-urls code=http://t0:30000,http://t1:30000   (code's teacher served by SGLang)
    --ref-load /ckpt/base                       (default: the student's initial checkpoint)
    --ref-urls http://r0:30000                  (the reference served by SGLang instead)
    --gopd-lambda math=1.25                     (default: 1.0, plain OPD)

A role is either *hosted* (a Megatron checkpoint, ``--teacher-load`` / ``--ref-load``: built on
the student's tensor/pipeline/expert-parallel ranks) or *served* (``--teacher-urls`` /
``--ref-urls``: SGLang servers on nodes of their own, any model SGLang serves, asked for prefill
log-probs; see :mod:`megatron_gopd.trainer.served`), domain by domain, in any mix; one domain key
is never both. ``--teacher-urls``/``--ref-urls`` may be repeated, or take several domains at once
separated by ``;`` (``"math=URL1,URL2;code=URL3"``); URLs of one domain are separated by ``,``.

:class:`Routing` holds the maps as the flags give them (checked without touching a file);
:meth:`Routing.resolve` turns them, once the prompt data is read, into a :class:`DomainRouting`:
``domain -> DomainRoute(teacher key, reference key or None, lambda, served URLs or None)``, the
one object every stage looks up. A domain with lambda == 1 has no reference: its reference term is
zero and its reference is never run (hosted) or asked (served).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial

from megatron_gopd.flags import flag
from megatron_gopd.trainer.data import DEFAULT_DOMAIN
from megatron_gopd.utils import GopdError

__all__ = ["DomainRoute", "DomainRouting", "Routing", "parse_domain_map", "parse_url_map"]


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


def parse_url_map(items: Iterable[str], what: str) -> dict[str, tuple[str, ...]]:
    """``["http://a,http://b"]`` -> ``{"default": ("http://a", "http://b")}``; an item may hold
    several ``DOMAIN=URL[,URL...]`` parts separated by ``;``. Every URL is ``http(s)://host:port``
    (a trailing ``/`` is dropped)."""
    parts = [part.strip() for item in items or [] for part in str(item).split(";")]

    def urls(value: str) -> tuple[str, ...]:
        out = tuple(u.strip().rstrip("/") for u in value.split(",") if u.strip())
        bad = [u for u in out if not u.startswith(("http://", "https://"))]
        if not out or bad:
            raise GopdError(
                f"{what}: {value!r} is not a list of server URLs (http://HOST:PORT[,...]); "
                f"bad: {', '.join(bad) or 'empty'}"
            )
        if len(set(out)) < len(out):
            raise GopdError(f"{what}: {value!r} names a server twice")
        return out

    return parse_domain_map([p for p in parts if p], what, convert=urls)


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
        default_help="required, unless --teacher-urls serves every teacher",
        help="teacher checkpoint, hosted in Megatron on the student's ranks; repeat as "
        "DOMAIN=PATH for multi-teacher runs",
    )
    teacher_urls: dict[str, tuple[str, ...]] = flag(
        name="--teacher-urls",
        action="append",
        metavar="[DOMAIN=]URL[,URL...]",
        parse=partial(parse_url_map, what="--teacher-urls"),
        default_factory=dict,
        default_help="none",
        help="the teacher served by SGLang servers of its own (prefill log-probs at temperature "
        "1; sampled estimator only), instead of --teacher-load; DOMAIN=URL,URL per domain, "
        "domains separated by ';' or by repeating the flag. API key: GOPD_TEACHER_API_KEY",
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
    reference_urls: dict[str, tuple[str, ...]] = flag(
        name="--ref-urls",
        action="append",
        metavar="[DOMAIN=]URL[,URL...]",
        parse=partial(parse_url_map, what="--ref-urls"),
        default_factory=dict,
        default_help="none",
        help="the reference served by SGLang servers of its own, instead of --ref-load (as "
        "--teacher-urls). API key: GOPD_REF_API_KEY",
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
        """What can be checked without files: lambdas are finite and >= 0, named domains exist,
        no domain is both hosted and served."""
        if not self.teachers and not self.teacher_urls:
            raise GopdError(
                "--teacher-load is required (or --teacher-urls; DOMAIN=PATH per domain for "
                "multi-teacher)"
            )
        for hosted, served, names in (
            (self.teachers, self.teacher_urls, ("--teacher-load", "--teacher-urls")),
            (self.references, self.reference_urls, ("--ref-load", "--ref-urls")),
        ):
            both = sorted(set(hosted) & set(served))
            if both:
                d = both[0]
                raise GopdError(
                    f"domain {d!r} is given both {names[0]} and {names[1]}: a role is either "
                    "hosted in Megatron or served by SGLang, not both"
                )
        for d, lam in self.lambdas.items():
            if not (math.isfinite(lam) and lam >= 0.0):  # NaN and inf too
                raise GopdError(
                    f"--gopd-lambda {d}={lam}: lambda must be finite and >= 0 (1 = OPD, >1 = ExOPD)"
                )
        for d in self.lambdas:
            if (
                d != DEFAULT_DOMAIN
                and d not in self._all_teachers
                and DEFAULT_DOMAIN not in self._all_teachers
            ):
                raise GopdError(f"--gopd-lambda names domain {d!r}, which has no teacher")

    @property
    def _all_teachers(self) -> set[str]:
        return set(self.teachers) | set(self.teacher_urls)

    @property
    def teacher_domains(self) -> set[str] | None:
        """The domains that have a teacher; None when a default teacher takes any domain."""
        return None if DEFAULT_DOMAIN in self._all_teachers else self._all_teachers

    def teacher_name(self, key: str) -> str:
        """The teacher ``key`` for logs: its checkpoint, or its servers."""
        if key in self.teacher_urls:
            return "served by " + ",".join(self.teacher_urls[key])
        return self.teachers[key]

    def reference_name(self, key: str) -> str:
        if key in self.reference_urls:
            return "served by " + ",".join(self.reference_urls[key])
        return self.references[key]

    def lam(self, domain: str) -> float:
        return float(self.lambdas.get(domain, self.lambdas.get(DEFAULT_DOMAIN, 1.0)))

    def resolve(self, domains: Iterable[str]) -> DomainRouting:
        """The route of each domain in ``domains`` (raises, naming the domain, when one has no
        teacher, or needs a reference and has none)."""
        routes = {}
        teachers = self._all_teachers
        references = set(self.references) | set(self.reference_urls)
        for d in sorted(set(domains)):
            # the domain's own entry (hosted or served) wins over the default one
            if d in teachers:
                teacher = d
            elif DEFAULT_DOMAIN in teachers:
                teacher = DEFAULT_DOMAIN
            else:
                raise GopdError(
                    f"domain {d!r} has no teacher (teachers: {', '.join(sorted(teachers))}); "
                    f"add --teacher-load {d}=PATH or --teacher-urls {d}=URL"
                )
            lam = self.lam(d)
            reference = None
            if lam != 1.0:
                reference = d if d in references else DEFAULT_DOMAIN
                if reference not in references:
                    raise GopdError(
                        f"domain {d!r} has lambda {lam} != 1 and needs a reference: give --ref-load "
                        f"or --ref-urls (default: the student's initial checkpoint)"
                    )
            routes[d] = DomainRoute(
                domain=d,
                teacher=teacher,
                reference=reference,
                lam=lam,
                teacher_urls=self.teacher_urls.get(teacher),
                reference_urls=None if reference is None else self.reference_urls.get(reference),
            )
        return DomainRouting(routes)


@dataclass(frozen=True)
class DomainRoute:
    """Where one domain's samples go: its teacher's key, its reference's key (None when lambda is
    1, so that no reference is built or run for it), its lambda, and for a served role the URLs
    of its servers (None: hosted in Megatron)."""

    domain: str
    teacher: str
    reference: str | None
    lam: float
    teacher_urls: tuple[str, ...] | None = None
    reference_urls: tuple[str, ...] | None = None

    @property
    def teacher_served(self) -> bool:
        return self.teacher_urls is not None

    @property
    def reference_served(self) -> bool:
        return self.reference_urls is not None


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
        """The teachers hosted in Megatron (the models the trainer builds)."""
        return sorted({r.teacher for r in self.routes.values() if not r.teacher_served})

    @property
    def reference_keys(self) -> list[str]:
        """The references hosted in Megatron that some domain needs."""
        return sorted(
            {
                r.reference
                for r in self.routes.values()
                if r.reference is not None and not r.reference_served
            }
        )

    @property
    def served_teachers(self) -> dict[str, tuple[str, ...]]:
        """``teacher key -> URLs`` of the teachers served by SGLang."""
        return {r.teacher: r.teacher_urls for r in self.routes.values() if r.teacher_served}

    @property
    def served_references(self) -> dict[str, tuple[str, ...]]:
        """``reference key -> URLs`` of the served references some domain needs."""
        return {
            r.reference: r.reference_urls
            for r in self.routes.values()
            if r.reference is not None and r.reference_served
        }

    @property
    def needs_reference(self) -> bool:
        """lambda == 1 is plain OPD: the reference term vanishes and is never computed."""
        return any(r.reference is not None for r in self.routes.values())
