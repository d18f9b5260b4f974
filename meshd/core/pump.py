"""The one loop that carries a sans-IO core's effects out: drain, hand each to a handler, repeat.

Every shell calls `pump` after each input it gives a core (the asyncio runtime and the in-memory
network for the membership core; the release fetch driver calls `drain` for each Swarm, whose
timer it arms itself); the shell only says what each effect means for it, by implementing the
handler the effects are written for (meshd.core.effects.EffectHandler,
meshd.core.swarm.SwarmEffectHandler). The pump
itself does no I/O: it is generic over the handler, so any core whose effects have
`apply(handler)` can be pumped the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, overload

__all__ = ["Effect", "EffectQueue", "EffectSource", "ErrorSink", "drain", "pump"]

H = TypeVar("H", contravariant=True)

# Told what failed ("take_effects", "get_timer" or the effect's type name) and the exception.
ErrorSink = Callable[[str, Exception], None]


class Effect(Protocol[H]):
    def apply(self, handler: H) -> None: ...


class EffectQueue(Protocol[H]):
    """A core's queued effects."""

    def take_effects(self) -> Sequence[Effect[H]]: ...


class EffectSource(EffectQueue[H], Protocol[H]):
    """A core as far as the pump cares: queued effects and the next deadline."""

    def get_timer(self) -> float: ...


@overload
def pump(core: EffectSource[H], handler: H) -> float: ...
@overload
def pump(core: EffectSource[H], handler: H, on_error: ErrorSink) -> float | None: ...


def pump(core: EffectSource[H], handler: H, on_error: ErrorSink | None = None) -> float | None:
    """Carry out the core's effects (see `drain`), then return its next deadline, get_timer().

    With `on_error`, a failing get_timer() is reported and None returned: the caller picks a
    deadline itself.
    """
    drain(core, handler, on_error)
    try:
        return core.get_timer()
    except Exception as e:
        if on_error is None:
            raise
        on_error("get_timer", e)
        return None


def drain(core: EffectQueue[H], handler: H, on_error: ErrorSink | None = None) -> None:
    """Carry out the core's effects, in order, until it queues no more.

    Carrying one out may make the core queue more (the handler answers a query at once): the
    loop picks those up in the same drain. Without `on_error` an exception propagates (tests and
    the simulator fail loudly). With it, the failure is reported and the drain goes on with the
    next effect, so one core bug or one unsendable packet never stops the protocol.
    """
    while True:
        try:
            effects = core.take_effects()
        except Exception as e:
            if on_error is None:
                raise
            on_error("take_effects", e)
            return
        if not effects:
            return
        for effect in effects:
            try:
                effect.apply(handler)
            except Exception as e:
                if on_error is None:
                    raise
                on_error(type(effect).__name__, e)
