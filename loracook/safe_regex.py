"""User regexes in linear time: recipe ``filter`` rules, ``extract.include``/``exclude``, and the keys of a PEFT
adapter's ``rank_pattern``/``alpha_pattern``.

Python's ``re`` backtracks: ``(a+)+$`` against forty ``a`` and a ``b`` takes longer than the universe, and
loracook matches every user regex against every tensor name, in ``validate`` and ``plan`` as well as ``run``. A
regex written in a recipe or shipped in someone's adapter_config.json must not be able to hang the tool, so
every user regex goes through here:

- **RE2** (the ``google-re2`` package, a dependency) matches in time linear in the text, whatever the pattern.
  It refuses the few features that cannot be matched that way (lookarounds, backreferences, possessive
  quantifiers, ``(?x)``): such a pattern gets a one-line error naming the feature instead of a hang.
- **Fallback** when RE2 cannot be imported (an exotic platform without a wheel): Python's ``re``, after a static
  check that refuses the shapes that backtrack exponentially (a repeated group that itself contains a repeat or
  an alternation, such as ``(a+)+`` or ``(a|ab)*``). That check is conservative, not a proof; the texts matched
  (module and tensor names) are short, which bounds the polynomial cases.

Every pattern must also compile with Python's ``re``, so that PEFT (which uses ``re``) reads the same adapter
config, and a recipe's meaning never depends on which engine ran it. Compiled patterns are cached.

>>> compile_regex(r"layers\\.1\\.").search("model.layers.1.mlp.up_proj")
True
>>> peft_pattern_value({"o_proj": 2}, "model.layers.0.self_attn.o_proj", 8)
2
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

try:  # pragma: no branch - the dependency is normally installed
    import re2 as _re2
except ImportError:  # pragma: no cover - exercised by the fallback tests through ENGINE
    _re2 = None

ENGINE = "re2" if _re2 is not None else "re"  # which engine matches user regexes in this process
MAX_PATTERN = 2000  # characters: recipes and adapter configs hold short patterns; longer ones are refused


class RegexError(ValueError):
    """A user regex that does not compile, or that could not be matched in linear time. A ValueError, so
    pydantic validators can raise it as is; the message is one line and says what to change."""


@dataclass(frozen=True)
class UserRegex:
    """A compiled user regex. The methods return booleans: callers only ever ask "does it match?"."""

    pattern: str
    _compiled: Any

    def search(self, text: str) -> bool:
        """Found anywhere in ``text`` (``re.search``)."""
        return self._compiled.search(text) is not None

    def match(self, text: str) -> bool:
        """Found at the start of ``text`` (``re.match``)."""
        return self._compiled.match(text) is not None

    def fullmatch(self, text: str) -> bool:
        return self._compiled.fullmatch(text) is not None


def compile_regex(pattern: str, *, what: str = "regex") -> UserRegex:
    """Compile a user regex for linear-time matching; RegexError (one line, with the fix) if it cannot be.

    ``what`` names the pattern in the message, e.g. ``"merge.weights.a filter"``."""
    if not isinstance(pattern, str):
        raise RegexError(f"{what} must be a string, got {type(pattern).__name__} {pattern!r}")
    return _compile_cached(pattern, what)


def check_regex(pattern: str) -> str:
    """A pydantic ``AfterValidator``: the pattern itself if it compiles, else a ValueError saying why."""
    compile_regex(pattern)
    return pattern


@functools.lru_cache(maxsize=4096)
def _compile_cached(pattern: str, what: str) -> UserRegex:
    if len(pattern) > MAX_PATTERN:
        raise RegexError(f"{what} is {len(pattern)} characters long; at most {MAX_PATTERN} are accepted")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise RegexError(f"{what} {_shown(pattern)} does not compile: {_reason(exc)}") from None
    if _re2 is not None:
        return UserRegex(pattern, _compile_re2(pattern, what))
    _refuse_backtracking(pattern, what)
    return UserRegex(pattern, re.compile(pattern))


def search(pattern: str, text: str) -> bool:
    """``re.search(pattern, text) is not None``, in linear time."""
    return compile_regex(pattern).search(text)


def peft_pattern_matches(key: str, module: str) -> bool:
    """PEFT's rule for a ``rank_pattern``/``alpha_pattern`` key: ``re.match(rf"(.*\\.)?({key})$", module)``."""
    what = "rank_pattern/alpha_pattern key"
    try:
        wrapped = compile_regex(rf"(.*\.)?({key})$", what=f"{what} {_shown(key)}, matched as")
    except RegexError:
        compile_regex(key, what=what)  # the key's own error is the clearer one when there is one
        raise
    return wrapped.match(module)


def peft_pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """The value of the first key that matches ``module`` as PEFT matches it (``get_pattern_key``), else
    ``default``. Raises RegexError for a key that is not a usable regex."""
    for key, value in patterns.items():
        if peft_pattern_matches(key, module):
            return value
    return default


# ------------------------------------------------------------------------------------------------- engines


def _compile_re2(pattern: str, what: str) -> Any:
    options = _re2.Options()
    options.log_errors = False  # RE2 would print its own multi-line complaint on stderr
    try:
        return _re2.compile(_to_re2(pattern), options=options)
    except _re2.error as exc:
        raise RegexError(
            f"{what} {_shown(pattern)} cannot be matched in linear time ({_reason(exc)}); lookarounds, "
            "backreferences, possessive quantifiers and (?x) are not supported: rewrite it without them"
        ) from None


def _to_re2(pattern: str) -> str:
    r"""Python spellings RE2 writes differently: ``\Z`` (end of text) is RE2's ``\z``."""
    return re.sub(r"(?<!\\)((?:\\\\)*)\\Z", r"\1\\z", pattern)


def _refuse_backtracking(pattern: str, what: str) -> None:
    """Without RE2: refuse a repeat (max > 1) around a group that holds another repeat or an alternation."""
    try:
        from re import _parser as sre_parse  # type: ignore[attr-defined]  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse  # type: ignore[no-redef]
    try:
        parsed = sre_parse.parse(pattern)
    except Exception:  # noqa: BLE001 - re.compile accepted it; a parser difference is not the user's problem
        return
    if _nested_repeat(parsed, sre_parse, inside=False):
        raise RegexError(
            f"{what} {_shown(pattern)} repeats a group that itself repeats or alternates, which can take "
            "exponential time without the RE2 engine: simplify it (e.g. (a+)+ -> a+), or pip install google-re2"
        )


def _nested_repeat(items: Any, sre_parse: Any, *, inside: bool) -> bool:
    constants = sre_parse
    repeats = {constants.MAX_REPEAT, constants.MIN_REPEAT}
    possessive = getattr(constants, "POSSESSIVE_REPEAT", None)
    if possessive is not None:
        repeats.add(possessive)
    for op, arg in items:
        if op in repeats:
            low, high, sub = arg
            if inside and high != low:
                return True
            if _nested_repeat(sub, sre_parse, inside=inside or high > 1):
                return True
        elif op is constants.BRANCH:
            if inside:
                return True
            if any(_nested_repeat(branch, sre_parse, inside=inside) for branch in arg[1]):
                return True
        elif op is constants.SUBPATTERN:
            if _nested_repeat(arg[-1], sre_parse, inside=inside):
                return True
        elif op in (constants.ASSERT, constants.ASSERT_NOT):
            if _nested_repeat(arg[1], sre_parse, inside=inside):
                return True
    return False


def _shown(pattern: str) -> str:
    return repr(pattern if len(pattern) <= 80 else pattern[:77] + "...")


def _reason(exc: BaseException) -> str:
    message = exc.args[0] if exc.args else exc
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return " ".join(str(message).split())
