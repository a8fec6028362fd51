"""llava-serve: an OpenAI-compatible HTTP API on the chat engine (chat completions and text completions, streamed or
not; models; health; metrics; vLLM's tokenize, detokenize and version).

llava-serve --model PATH_OR_ID [--host 127.0.0.1] [--port 8000] [--allowed-local-media-path DIR] [--allow-image-urls]

Thin, as app.py is: requests become ChatEngine.generate calls, whose answers the scheduler decodes in one batch with
everyone else's, and whose prompts reuse cached prefixes (clients send the whole conversation every time).
Everything a client sends is hostile: the body is read up to a limit before parsing, images are checked by
engine.media and engine.untrusted before decoding, and the API key, if any, is compared and never logged or echoed.
"""

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import importlib.metadata
import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .chat import ChatEngine, ChatError
from .prompts import ContextTooLong, StructureRefused, TokenRulesRefused, TruncationRefused
from .answer_text import Progress
from .decoding import NonFiniteScores, Sampling
from .engine_process import EngineProcess, EngineStopped
from .media import MediaPolicy
from .metrics import render
from .openai_api import (APIError, SamplingRequest, TokenizeRequest, checked_structure, engine_messages, parse_completion_request,
                         parse_detokenize_request, parse_request, parse_tokenize_request)
from .openai_responses import ChatCompletion, TextCompletion
from .scheduler import QueueFull
from .tool_calls import ToolCallCompletion

from .serve_cli import MAX_BODY_BYTES, STREAM_INTERVAL

log = logging.getLogger("llava-serve")
VERSION = importlib.metadata.version("llava-plugin")
T = TypeVar("T")
MAX_COMPLETION_TOKENS = 4096
RETRY_SOON = {"Retry-After": "1"}  # a 503's: the openai client waits that long before its retry


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(engine: ChatEngine, model_name: str, policy: MediaPolicy | None = None, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_concurrent: int = 64, stream_interval: float = STREAM_INTERVAL) -> FastAPI:
    """The API over `engine`. More than `max_concurrent` requests at once are answered 503. A stream sends at most
    one chunk per `stream_interval` seconds (the tokens of the pause go together): fewer chunks to encode and send
    when the CPU is busy."""
    if api_key is not None:
        api_key = api_key.strip()  # a key from a file ends in a newline, which no client sends
        if not api_key:  # "Bearer " with nothing after it would match
            raise ValueError("the API key is empty: give a key, or None to serve without one")
    policy = policy or MediaPolicy()  # default: data URLs only
    @contextlib.asynccontextmanager
    async def lifespan(app):
        # each request's blocking reads of the engine take a worker thread: allow one per admitted request
        anyio.to_thread.current_default_thread_limiter().total_tokens = max(40, max_concurrent + 8)
        yield

    app = FastAPI(title="llava-serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    state = {"active": 0}
    prompter = getattr(engine, "prompter", None)  # the engine's tokens' tokenizer (in either process)
    tokenizer = prompter.processor.tokenizer if prompter is not None else None

    def sampling_of(asked: SamplingRequest, choice: int) -> Sampling:
        """The request's sampling for its choice `choice`; a logit_bias or stop_token_ids naming a token the model does
        not have is a 400 here (on the scheduler's thread its indexing would fail every answer of the batch)."""
        sampling = asked.sampling(MAX_COMPLETION_TOKENS, choice)
        if tokenizer is None:
            return sampling
        named = (("logit_bias", [token for token, _ in sampling.logit_bias]), ("stop_token_ids", sampling.stop_token_ids),
                 ("allowed_token_ids", sampling.allowed_token_ids or ()))
        for param, tokens in named:
            if outside := [token for token in tokens if not 0 <= token < len(tokenizer)]:
                raise APIError(400, f"{param}: the token id {outside[0]} is outside the model's vocabulary (0 .. {len(tokenizer) - 1})",
                               param=param)
        if asked.bad_words:
            sampling = dataclasses.replace(sampling, bad_words=asked.bad_word_sequences(tokenizer))
        return sampling

    def kept_tokens(asked: SamplingRequest) -> int | None:
        """vLLM's truncate_prompt_tokens: the prompt's last this many tokens (-1: the model's context); a 400 past
        the context."""
        keep = asked.truncate_prompt_tokens
        context = tokenizer.model_max_length if tokenizer is not None else None
        if keep == -1:
            return context
        if keep is not None and context is not None and keep > context:
            raise APIError(400, f"truncate_prompt_tokens: {keep} is more than the model's context ({context} tokens)",
                           param="truncate_prompt_tokens")
        return keep

    def prompting_of(chat) -> dict:
        """Prompter.prompt's options for a chat request."""
        return {"rendering": chat.rendering, "salt": chat.cache_salt, "keep_last": kept_tokens(chat)}

    def with_usage(asked: SamplingRequest) -> bool:
        return bool(asked.stream and asked.stream_options and asked.stream_options.include_usage)

    def continuous(asked: SamplingRequest) -> bool:
        return with_usage(asked) and asked.stream_options.continuous_usage_stats

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):  # unknown routes, wrong methods
        return error_response(APIError(error.status_code, str(error.detail), code=None))

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, error: ClientDisconnect):  # nobody to answer, nothing to log
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("internal error on %s", request.url.path)  # the path only: never the headers
        return error_response(APIError(500, "internal server error", kind="server_error"))

    def authorize(request: Request):
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")  # the scheme's case is free (RFC 9110)
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "a valid API key is needed (Authorization: Bearer ...)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        if not getattr(engine, "alive", True):  # the engine's process is gone: a supervisor should restart us
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        if hasattr(engine, "responsive") and not engine.responsive():  # alive but silent: stopped or frozen
            return JSONResponse({"status": "engine not responding"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():  # like /health, without the key (as vLLM's): counts and times only, see engine.metrics
        stats = engine.stats() if hasattr(engine, "stats") else {}
        return PlainTextResponse(render(stats, state["active"]), media_type="text/plain; version=0.0.4; charset=utf-8")

    served = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "llava-plugin", "root": model_name}
    if tokenizer is not None:  # vLLM's model card says its context: clients size their prompts by it
        served["max_model_len"] = tokenizer.model_max_length

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [served]}

    @app.get("/v1/models/{model:path}")  # a hub id has a slash in it
    async def model(request: Request, model: str):
        authorize(request)
        check_model(model)
        return served

    @app.get("/version")
    async def version():  # vLLM's, without the key as /health
        return {"version": VERSION}

    if tokenizer is not None:
        @app.post("/tokenize")
        async def tokenize(request: Request):
            """vLLM's: a prompt's token ids as the model reads them (a conversation's as /v1/chat/completions lays
            it out, each image's tokens included: its count is that request's prompt_tokens)."""
            authorize(request)
            asked = parse_tokenize_request(await read_body(request, max_body_bytes))
            check_model(asked.model)
            ids = await run_in_threadpool(tokens_of, asked)
            return {"count": len(ids), "max_model_len": tokenizer.model_max_length, "tokens": ids,
                    "token_strs": tokenizer.convert_ids_to_tokens(ids) if asked.return_token_strs else None}

        @app.post("/detokenize")
        async def detokenize(request: Request):
            authorize(request)
            asked = parse_detokenize_request(await read_body(request, max_body_bytes))
            check_model(asked.model)
            if (outside := next((token for token in asked.tokens if not 0 <= token < len(tokenizer)), None)) is not None:
                raise APIError(400, f"tokens: the token id {outside} is outside the model's vocabulary (0 .. {len(tokenizer) - 1})",
                               param="tokens")
            return {"prompt": await run_in_threadpool(tokenizer.decode, asked.tokens)}

    def tokens_of(asked: TokenizeRequest) -> list[int]:
        if asked.messages is None:
            return tokenizer(asked.prompt, add_special_tokens=asked.add_special_tokens is not False)["input_ids"]
        messages, images = engine_messages(asked, policy)
        with api_errors():
            prompt = prompter.prompt(messages, images, asked.rendering)
            ids = prompt.ids if prompt.ids is not None else prompter.inputs(prompt)[0]
        return ids[0].tolist()

    def check_model(name: str | None):
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist here; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        chat = parse_request(await read_body(request, max_body_bytes))

        def begin_with(choice: int):
            def begin(loop, interval: float):
                messages, images = engine_messages(chat, policy)
                sampling = sampling_of(chat, choice)
                if isinstance(engine, EngineProcess):  # the reader thread hands its tokens to this loop
                    return engine.answer(messages, images, sampling, stop=chat.stops, interval=interval, loop=loop,
                                         prompting=prompting_of(chat))
                cancel = threading.Event()
                return ThreadedAnswer(engine.generate(messages, images, sampling, stop=chat.stops, interval=interval, cancel=cancel,
                                                      prompting=prompting_of(chat)), cancel)
            return begin

        layout = dict(with_usage=with_usage(chat), tokenizer=tokenizer, logprobs=bool(chat.logprobs),
                      as_ids=bool(chat.return_tokens_as_token_ids), choices=chat.choices, continuous=continuous(chat), echo=chat.echoed,
                      token_ids=bool(chat.return_token_ids), prompt_logprobs=chat.prompt_logprobs, role=chat.response_role)
        response = (ChatCompletion(model_name, **layout) if chat.tool_plan is None
                    else ToolCallCompletion(chat.tool_plan, model_name, **layout))
        return await respond(request, chat, [begin_with(choice) for choice in range(chat.choices)], response, counted="n")

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        completion = parse_completion_request(await read_body(request, max_body_bytes))

        prompts, choices = completion.prompts, completion.choices
        response = TextCompletion(model_name, with_usage(completion), tokenizer, logprobs=completion.logprobs is not None,
                                  as_ids=bool(completion.return_tokens_as_token_ids), choices=choices,
                                  continuous=continuous(completion), echo=bool(completion.echo), answers=len(prompts) * choices,
                                  token_ids=bool(completion.return_token_ids), prompt_logprobs=completion.prompt_logprobs)

        def begin_with(index: int):  # prompt index // choices, its choice index % choices (vLLM's order)
            def begin(loop, interval: float):
                sampling = sampling_of(completion, index % choices)
                # the prompt's tokens (ChatError here, not at the engine's first read: a stream of several prompts has
                # begun by then): the response echoes them, and names their log-probabilities
                made = response.prompts[index] = engine.prompter.text_prompt(
                    prompts[index // choices], room=min(1, sampling.max_new_tokens), add_special_tokens=completion.add_special_tokens is not False,
                    salt=completion.cache_salt, keep_last=kept_tokens(completion))
                if isinstance(engine, EngineProcess):
                    return engine.answer_completion(made, sampling, stop=completion.stops, interval=interval, loop=loop)
                cancel = threading.Event()
                return ThreadedAnswer(engine.complete(made, sampling, stop=completion.stops, interval=interval, cancel=cancel), cancel)
            return begin

        return await respond(request, completion, [begin_with(index) for index in range(len(prompts) * choices)], response,
                             param="prompt", counted="n" if choices > 1 else "prompt")

    async def respond(request: Request, asked: SamplingRequest, begins: list[Callable], completion: ChatCompletion,
                      param: str = "messages", counted: str = "n"):
        """A request's answers (n choices, or a completion's several prompts: a choice each, decoded together),
        whole or streamed, laid out by `completion`. Each `begin(loop, interval)` runs in a worker thread (one hop
        there and back: each costs a busy CPU a fraction of a ms) and returns the engine's answer to read; the input
        it refuses came in `param`. Each answer takes a place of `max_concurrent` (too many is the fault of
        `counted`, the field that asked for them)."""
        check_model(asked.model)
        if getattr(engine, "alive", False) and not engine.responsive():  # alive but frozen, or stopped by a signal: it may never answer
            raise APIError(503, "the engine is not responding (no heartbeat); retry shortly", code="engine_not_responding",
                           kind="server_error", headers=RETRY_SOON)
        if asked.structure is not None:  # once per request, in a worker thread: a large spec's grammar can take a second
            await run_in_threadpool(checked_structure, asked)
        if len(begins) > max_concurrent:
            raise APIError(400, f"{counted}: {len(begins)} answers in one request; this server answers at most {max_concurrent} at once",
                           param=counted)
        if state["active"] + len(begins) > max_concurrent:
            raise APIError(503, f"the server is busy ({max_concurrent} requests at once); retry shortly", code="queue_full",
                           kind="server_error", headers=RETRY_SOON)
        state["active"] += len(begins)
        releases = [Release(state) for _ in begins]
        loop = asyncio.get_running_loop()
        structure = asked.structure[0] if asked.structure else None  # the field a refusal of its grammar names
        interval = stream_interval if asked.stream else 0.5  # a whole answer: its reader need not wake per token

        def started(release: Release, begin: Callable, read: bool):
            """Starts an answer (in a worker thread): input errors surface here, before any byte is sent. With
            `read`, its first Progress is read in the same thread (an in-process answer's: one hop less)."""
            # the answer is the release's as soon as it exists: a request cancelled meanwhile (the await of this
            # thread is) still lets go of it, and one whose client left has it cancelled at once
            with api_errors(param, structure):
                release.answer = begin(loop, interval)
                if release.gone:
                    release.cancel()
                if read and isinstance(release.answer, ThreadedAnswer):
                    release.answer.read_first()

        async def first(release: Release, begin: Callable) -> Progress:
            await run_in_threadpool(started, release, begin, True)
            return await next_progress(release.answer, param, structure)  # the engine's refusals come here

        async def answered(release: Release, begin: Callable) -> Progress:
            progress = await first(release, begin)
            return progress if progress.finish_reason else await rest(release.answer, param, structure)

        async def release_all():
            for release in releases:
                await release()

        def gone():  # the client left: every answer ends now, also one whose thread waits for its first token
            for release in releases:
                release.cancel()

        if not asked.stream:
            makers = [functools.partial(answered, release, begin) for release, begin in zip(releases, begins)]
            try:
                progresses = await unless_gone(request, lambda: together(makers), gone)
                if completion.heavy:  # naming every token and its alternatives can take seconds: not on the event loop
                    return await run_in_threadpool(completion.whole, *progresses)
                return completion.whole(*progresses)
            finally:
                await release_all()
        # A stream begins once every answer has started (its input checked) and the first one's first Progress has
        # come (the engine's refusals of the prompt, which n choices share, are still HTTP errors); the others' first
        # tokens come in the stream, so that its first byte does not wait for every choice to find a place.
        try:
            if len(begins) > 1:
                starts = [functools.partial(run_in_threadpool, started, release, begin, False) for release, begin in zip(releases, begins)]
                await unless_gone(request, lambda: together(starts), gone)
                opening = await unless_gone(request, lambda: next_progress(releases[0].answer, param, structure), gone)
            else:
                opening = await unless_gone(request, lambda: first(releases[0], begins[0]), gone)
        except BaseException:
            await release_all()
            raise
        # the release also as a background task: a client gone before the stream's first byte never starts `events`
        return StreamingResponse(events(releases, opening, completion, param, structure), media_type="text/event-stream",
                                 background=BackgroundTask(release_all))

    return app


@contextlib.contextmanager
def api_errors(param: str = "messages", structure: str | None = None):
    """The engine's refusals as API errors; `param`: the request's field a refused input came in, `structure` the
    one its structured output came in (which a refusal of the output's grammar names)."""
    try:
        yield
    except StructureRefused as error:
        raise APIError(400, str(error), param=structure or param) from None
    except TruncationRefused as error:
        raise APIError(400, str(error), param="truncate_prompt_tokens") from None
    except TokenRulesRefused as error:  # its message begins with the field to blame
        blamed = str(error).partition(":")[0]
        raise APIError(400, str(error), param=blamed if blamed in ("stop_token_ids", "bad_words") else "allowed_token_ids") from None
    except ChatError as error:
        raise APIError(400, str(error), param=param,
                       code="context_length_exceeded" if isinstance(error, ContextTooLong) else None) from None
    except QueueFull as error:
        raise APIError(503, str(error), code="queue_full", kind="server_error", headers=RETRY_SOON) from None
    except EngineStopped as error:
        raise APIError(503, str(error), code="engine_stopped", kind="server_error") from None
    except NonFiniteScores as error:  # this answer's only: the others go on
        raise APIError(500, str(error), code="model_output_not_finite", kind="server_error") from None


async def next_progress(answer, param: str = "messages", structure: str | None = None) -> Progress:
    with api_errors(param, structure):
        return await answer.next()


class ThreadedAnswer:
    """A ChatEngine.generate iterator (the engine in this process), read from the event loop as an
    engine_process.StreamedAnswer is: a read blocks until the scheduler has tokens, so each one takes a worker
    thread. At the last Progress the iterator is closed in the thread that read it, so that the engine lets go of
    the answer without one more hop (see Release)."""

    def __init__(self, iterator, cancel: threading.Event | None = None):
        self._iterator, self._first = iterator, None
        # set by `cancel`: the engine ends the answer at once, also while it waits for a place in the batch
        self._cancel = cancel or threading.Event()
        # a read's thread goes on when its await is cancelled (a stream of several answers that ends early): closing
        # cancels the answer, which ends that read, then waits for it, since a generator running in a thread cannot
        # be closed
        self._reading = threading.Lock()

    def read_first(self):
        """The first Progress, read in the caller's worker thread (the one that started the answer)."""
        self._first = self._read()

    async def next(self) -> Progress:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await run_in_threadpool(self._read)

    def _read(self) -> Progress:
        with self._reading:
            progress = next(self._iterator)
            if progress.finish_reason is not None:
                self._iterator.close()
            return progress

    @property
    def answering(self) -> bool:
        """Whether closing has work to do (a generator that finished or was closed has no frame left)."""
        return getattr(self._iterator, "gi_frame", True) is not None

    def cancel(self):
        self._cancel.set()

    def close(self):
        if self.answering:
            self.cancel()
        with self._reading:
            self._iterator.close()


async def together(makers: list[Callable[[], Awaitable[T]]]) -> list[T]:
    """What each maker's awaitable gives, in order, all awaited at once; the first error cancels the others and is
    raised as itself (a task group would wrap it in an ExceptionGroup: a 500)."""
    if len(makers) == 1:
        return [await makers[0]()]
    results, errors = [None] * len(makers), []

    async def run(index: int, make: Callable[[], Awaitable[T]]):
        try:
            results[index] = await make()
        except Exception as error:
            errors.append(error)
            group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        for index, make in enumerate(makers):
            group.start_soon(run, index, make)
    if errors:
        raise errors[0]
    return results


async def rest(answer, param: str = "messages", structure: str | None = None) -> Progress:
    """The answer's final Progress."""
    while (progress := await next_progress(answer, param, structure)).finish_reason is None:
        pass
    return progress


async def unless_gone(request: Request, reading: Callable[[], Awaitable[T]], on_gone: Callable[[], None] | None = None) -> T:
    """What `reading()` gives, or ClientDisconnect as soon as the client leaves first. Nothing else would notice before
    the next byte is sent: a request still waiting for its first token (for a place in the batch, or from an engine
    that froze) would hold its place for nobody, and so would a whole answer computed to max_tokens for a client
    that timed out, once per retry. The caller's release then has the engine let go of it."""
    outcome = {}

    async def read():
        try:
            outcome["value"] = await reading()
        except Exception as error:  # kept past the group, which would wrap it in an ExceptionGroup (a 500)
            outcome["error"] = error
        group.cancel_scope.cancel()

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":  # the body is read: only the disconnect comes
            pass
        outcome.setdefault("error", ClientDisconnect())
        if on_gone is not None:  # before the cancel: a read in a worker thread ends only when its answer does
            on_gone()
        group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(read)
        group.start_soon(watch)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class Release:
    """Frees a request's place and has the engine let go of its answer: once, from whichever path gets there first."""

    def __init__(self, state: dict):
        self.state, self.answer, self.freed, self.done = state, None, False, False
        self.gone = False  # its client left: an answer that starts after that is cancelled as it starts

    def cancel(self):
        """Ends the answer in the engine now (its client left), without waiting for anything."""
        self.gone = True
        if isinstance(self.answer, ThreadedAnswer):  # an engine process's answer is cancelled by its close
            self.answer.cancel()

    def free(self):
        """The request's place only (no wait): a client may send its next request the moment it reads [DONE]."""
        if not self.freed:
            self.freed = True
            self.state["active"] -= 1

    async def __call__(self):
        if self.done:
            return
        self.done = True
        self.free()
        if self.answer is None:
            return
        if self.answer.answering:  # a cancel to send, or a generator to close: either can wait, so in a worker thread
            with anyio.CancelScope(shield=True):  # also when the client went away
                await run_in_threadpool(self.answer.close)
        else:
            self.answer.close()  # an answer that ended: nothing to wait for


async def events(releases: list[Release], first: Progress, completion: ChatCompletion, param: str = "messages",
                 structure: str | None = None):
    """Server-sent events of each answer: its opening (a chat stream's role), its text as it grows, its finish
    reason; then the usage if asked, then [DONE]. `first`: the first answer's first Progress (the others' is read
    here). Several answers' chunks interleave as they come, each naming its choice; one that
    fails ends the stream with an error that names it. Events ready at once go out in one write (an opening with
    the first text; the end's three): each write is a send here and a read for the client, whose CPU a loaded
    machine shares."""
    def sse(payload: dict | list[dict] | None) -> str:
        """A chunk's event; several chunks' (a tool call's ending), or none (text a completion holds back)."""
        if payload is None or isinstance(payload, list):
            return "".join(sse(each) for each in payload or [])
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    count = len(releases)
    sent, finals, opened, ready = [""] * count, [None] * count, [False] * count, ""
    reading: dict[asyncio.Future, int] = {}  # the reads under way of the answers still going, several at once

    async def take(index: int, progress: Progress) -> bool:
        """The chunks of an answer's new Progress (its opening first, if it is its first); whether it ended."""
        nonlocal ready
        if not opened[index]:
            opened[index] = True
            # an echo's opening names the whole prompt's tokens when log-probabilities are asked: not on the event loop
            if completion.prompt_logprobs is not None:  # made here, read by the choice's first chunk
                await run_in_threadpool(completion.prompt_facts, index, progress)
            opening = (await run_in_threadpool(completion.opening, progress, index) if completion.logprobs
                       else completion.opening(progress, index))
            ready += sse(opening)
        finals[index] = progress
        if progress.text.startswith(sent[index]) and len(progress.text) > len(sent[index]):
            ready += sse(completion.delta(progress.text[len(sent[index]):], progress, index))
            sent[index] = progress.text
        if progress.finish_reason is None:
            return False
        ready += sse(completion.ending(progress, index))
        releases[index].free()
        return True

    def read(index: int) -> asyncio.Future:
        return asyncio.ensure_future(next_progress(releases[index].answer, param, structure))

    failed = None  # the choice whose read failed
    try:
        going = ([] if await take(0, first) else [0]) + list(range(1, count))
        while going == [0] and count == 1:  # one answer (most streams): awaited as it is, no task per read
            if ready:
                yield ready
                ready = ""
            if await take(0, await next_progress(releases[0].answer, param, structure)):
                going = []
        reading.update({read(index): index for index in going})
        while reading:
            if ready:
                yield ready
                ready = ""
            done, _ = await asyncio.wait(reading, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=reading.get):
                index = failed = reading.pop(future)
                progress = future.result()
                failed = None
                if not await take(index, progress):
                    reading[read(index)] = index
        if completion.with_usage:
            ready += sse(completion.usage_chunk(*finals))
    except APIError as error:
        if failed is not None and count > 1:
            error.message = f"choice {failed}: {error.message}"
        ready += sse(error.body())
    except Exception:
        log.exception("a stream failed")
        ready += sse(APIError(500, "internal server error", kind="server_error").body())
    finally:
        for future in reading:  # another answer failed, or the client left: the rest is not read
            if future.done() and not future.cancelled():
                future.exception()  # failed too, at the same time: seen (asyncio would log it as never retrieved)
            future.cancel()
        for release in releases:
            release.free()
    try:
        yield ready + "data: [DONE]\n\n"
    finally:
        for release in releases:
            await release()


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared):,} bytes; the limit is {limit:,}", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():  # also without a Content-Length (chunked): never more than the limit
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over the limit of {limit:,} bytes", code="request_too_large")
    return bytes(body)


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Serves `app` on a thread for the `with` block; yields its base URL (`port=0`: a free port)."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose protocol says TCP (0 does not), and without
    # it every keep-alive request waited 40 ms for the client's delayed ACK of the response's headers
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
