"""What a model call costs, and the budgets that stop calls before they overspend.

Prices are US dollars per million tokens. A model's price is, in order:

1. its entry in the price table ``HEDDLE_PRICES`` names (``model: {input_per_mtok,
   output_per_mtok}``, loaded once per path), by exact model id;
2. the built-in price of its model family (:data:`DEFAULT_PRICES`, longest
   matching prefix, so ``claude-sonnet-4-6`` and ``claude-sonnet-4-20250514``
   both get the Sonnet price);
3. free (0) for the local backends (LM Studio, Ollama, the embedded model);
4. unknown: the call's cost is not counted, and a call under a budget is refused
   (a budget that cannot be counted is no budget).

A budget (``budget_usd`` of a worker config, of a task call, of a pipeline
goal) is checked before every provider call: when what was already spent plus
the least the next call costs (its prompt, estimated at 4 characters a token,
at the input price) would pass the budget, the call is not made and the task
fails with :class:`~heddle.errors.BudgetExceeded`, naming what was spent and the
budget. Output is priced once the provider reports it, so a task can end over
its budget by at most one call's output.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from heddle.context import task_context
from heddle.errors import BudgetExceeded, LLMConfigError
from heddle.llm.config import Price, load_prices
from heddle.send import usd
from heddle.settings import LOCAL_BACKENDS, LLMSettings

__all__ = ["DEFAULT_PRICES", "Budget", "price_for", "task_budget", "usd"]

#: Built-in prices by model-id prefix (US dollars per million input / output tokens),
#: as Anthropic listed them; the longest matching prefix wins. A price table entry
#: for the exact model id beats them.
DEFAULT_PRICES: dict[str, Price] = {
    "claude-opus-4-20250514": Price(15.0, 75.0),
    "claude-opus-4-0": Price(15.0, 75.0),
    "claude-opus-4-1": Price(15.0, 75.0),
    "claude-3-opus": Price(15.0, 75.0),
    "claude-opus": Price(5.0, 25.0),  # Opus 4.5 and later
    "claude-sonnet": Price(3.0, 15.0),
    "claude-3-7-sonnet": Price(3.0, 15.0),
    "claude-3-5-sonnet": Price(3.0, 15.0),
    "claude-haiku": Price(1.0, 5.0),  # Haiku 4.5 and later
    "claude-3-5-haiku": Price(0.8, 4.0),
    "claude-3-haiku": Price(0.25, 1.25),
}
_BY_LENGTH = sorted(DEFAULT_PRICES, key=len, reverse=True)
_FREE = Price(0.0, 0.0)
LOCAL_NAMES = frozenset({*LOCAL_BACKENDS, "local"})

_tables: dict[str, dict[str, Price]] = {}
_tables_lock = threading.Lock()


def price_for(model: str, settings: LLMSettings, backend: str = "") -> Price | None:
    """The price of ``model`` (served by ``backend``), or None when it is not known.

    Raises:
        ConfigFileError: The ``HEDDLE_PRICES`` table is invalid (every problem, with line).
    """
    if settings.prices_path:
        with _tables_lock:
            table = _tables.get(settings.prices_path)
            if table is None:
                table = _tables[settings.prices_path] = load_prices(settings.prices_path)
        if model in table:
            return table[model]
    for prefix in _BY_LENGTH:
        if model.startswith(prefix):
            return DEFAULT_PRICES[prefix]
    if backend in LOCAL_NAMES:
        return _FREE
    return None


@dataclass
class Budget:
    """The budget one :func:`~heddle.llm.complete` call keeps to.

    Attributes:
        limit_usd: The budget.
        spent_usd: Spent so far: by the task before this call, plus this call's replies.
        what: Whose budget, for the error (``the task's budget_usd``).
    """

    limit_usd: float
    spent_usd: float = 0.0
    what: str = "budget_usd"

    def before_call(self, backend: str, model: str, tier: str, prompt_tokens: int, settings: LLMSettings,
                    step: str = "call") -> None:
        """Refuse the next provider call if it would take the spending past the budget.

        Raises:
            BudgetExceeded: What was spent plus the least the call costs passes the budget.
            LLMConfigError: The model has no price, so the budget cannot be kept.
        """
        price = price_for(model, settings, backend)
        if price is None:
            raise LLMConfigError(
                f"cannot keep to {self.what} {usd(self.limit_usd)}: {backend} model {model} has no price; "
                f"add `{model}: {{input_per_mtok: N, output_per_mtok: N}}` to the price table (HEDDLE_PRICES)"
            )
        least = price.cost_usd(prompt_tokens, 0)
        if self.spent_usd + least > self.limit_usd:
            raise BudgetExceeded(
                f"budget exceeded: spent {usd(self.spent_usd)} of {self.what} {usd(self.limit_usd)}; the next "
                f"{step} (tier {tier}, {backend} model {model}, about {prompt_tokens} prompt tokens, at least "
                f"{usd(least)}) would pass it, so it was not made",
                spent_usd=self.spent_usd, budget_usd=self.limit_usd,
            )

    def spend(self, model: str, backend: str, input_tokens: int, output_tokens: int, settings: LLMSettings) -> None:
        """Count one reply's tokens."""
        price = price_for(model, settings, backend)
        if price is not None:
            self.spent_usd += price.cost_usd(input_tokens, output_tokens)


def task_budget(budget_usd: float | None) -> Budget | None:
    """The budget a model call keeps to: the lower of ``budget_usd`` and the running task's.

    Inside a task, what the task already spent (its ``cost_usd`` metadata) counts
    against it, so several calls in one task share one budget; the budget in
    force is recorded in the metadata as ``budget_usd``.
    """
    ctx = task_context()
    limits = [(b, w) for b, w in ((budget_usd, "budget_usd"),
                                  (ctx.budget_usd if ctx is not None else None, "the task's budget_usd"))
              if b is not None]
    if not limits:
        return None
    limit, what = min(limits)
    spent = 0.0
    if ctx is not None:
        spent = float(ctx.meta.get("cost_usd") or 0.0)
        ctx.meta["budget_usd"] = limit
    return Budget(limit, spent, what)
