"""Drafting through any OpenAI-compatible chat-completions server with the official async client.

The client's own retries do the backoff (429, 5xx, timeouts; Retry-After honoured). An httpx hook counts every
request it sends, so the summary can report retries. The API key goes to the client and nowhere else.
"""

from dataclasses import dataclass

import openai

from .prompt_sets import BUILTIN, PromptSet

DEFAULT_MODEL = "gpt-4.1"
# USD per million tokens (input, output), standard tier, as published when this was written: an estimate only.
PRICES = {
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4": (30.00, 60.00),
}
# Errors that retrying cannot fix: stop the run instead of failing every job the same way.
FATAL_ERRORS = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError, openai.BadRequestError)


@dataclass
class Usage:
    calls: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def retries(self) -> int:
        return max(self.requests - self.calls, 0)


def estimated_cost(model: str, usage: Usage, batch: bool = False) -> float | None:
    price = PRICES.get(model)
    if price is None:
        return None
    cost = (usage.prompt_tokens * price[0] + usage.completion_tokens * price[1]) / 1e6
    return cost / 2 if batch else cost  # the Batch API bills half


def make_client(api_key: str | None, base_url: str | None, max_retries: int, timeout: float, usage: Usage,
                from_environment: bool = True) -> openai.AsyncOpenAI:
    """With `from_environment=False` the client carries only what it is given: the openai client otherwise fills a
    missing key, organization, project and base URL from OPENAI_* variables, which on a server are the operator's."""
    async def count(request):
        usage.requests += 1

    if not from_environment and not (api_key and base_url):
        raise ValueError("a request that may not use the environment needs its own API key and base URL")
    http_client = openai.DefaultAsyncHttpxClient(event_hooks={"request": [count]})
    client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout, http_client=http_client)
    if not from_environment:
        client.organization = client.project = client.admin_api_key = client.webhook_secret = None
        client._custom_headers = {}  # OPENAI_CUSTOM_HEADERS may hold the operator's Authorization; no public setter
    return client


class OpenAIDrafter:
    def __init__(self, model: str = DEFAULT_MODEL, api_key: str | None = None, base_url: str | None = None,
                 max_retries: int = 8, timeout: float = 120.0, temperature: float = 0.7, prompts: PromptSet = BUILTIN,
                 from_environment: bool = True):
        self.model, self.temperature, self.prompts = model, temperature, prompts
        self.usage = Usage()
        self.client = make_client(api_key, base_url, max_retries, timeout, self.usage, from_environment)

    def request_body(self, kind: str, annotation) -> dict:
        return {"model": self.model, "messages": self.prompts.messages(kind, annotation), "temperature": self.temperature}

    async def draft(self, kind: str, annotation, attempt: int) -> str:
        self.usage.calls += 1
        response = await self.client.chat.completions.create(**self.request_body(kind, annotation))
        if response.usage is not None:
            self.usage.prompt_tokens += response.usage.prompt_tokens or 0
            self.usage.completion_tokens += response.usage.completion_tokens or 0
        return (response.choices[0].message.content or "") if response.choices else ""

    async def close(self):
        await self.client.close()
