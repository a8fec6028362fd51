"""The chat engine in a process of its own, for llava-serve: HTTP on one interpreter, the model on another.

Why: one Python process runs one thread at a time. With the HTTP server (parsing, validation, server-sent events)
and the scheduler's thread in one process, every request's web work waits for the model's Python and the other way
round, and a second core stays idle however many clients there are. vLLM splits its API server from its engine
core for the same reason. Here the parent keeps the web work and makes each request's Prompt (prompts: the images
decoded and fingerprinted, the chat template rendered, the tokens laid out; about 1 ms per request); the child owns
the model, the scheduler and the prefix cache, and sends back token ids; the parent turns them into text
(answer_text), which took about a tenth of the child's time at eight streams.

`EngineProcess.generate` has ChatEngine.generate's signature and behaviour: an iterator of Progress, ChatError and
QueueFull raised as themselves, and closing it early cancels the answer in the child. `EngineProcess.answer` is the
same for the server's event loop: the reader thread hands the child's messages straight to the loop, where each
Progress is awaited (StreamedAnswer), so that a chunk of a stream costs no hop to a worker thread and back."""

import asyncio
import dataclasses
import itertools
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

from transformers import AutoProcessor

from .answer_text import AnswerText, Progress, Tokens, as_text, chat_context, continuation
from .decoding import NonFiniteScores, Sampling
from .prompts import ChatError, ContextTooLong, Prompt, Prompter, StructureRefused, TokenRulesRefused, TruncationRefused
from .scheduler import QueueFull

_ERRORS = {"ChatError": ChatError, "ContextTooLong": ContextTooLong, "StructureRefused": StructureRefused, "QueueFull": QueueFull,
           "NonFiniteScores": NonFiniteScores, "TruncationRefused": TruncationRefused,
           "TokenRulesRefused": TokenRulesRefused}
_END = object()
# a Tokens crosses the pipe as a plain tuple of its fields in order (pickling a dataclass per message cost more than
# its tokens); the reader makes it again with Tokens(*fields)
TOKENS_FIELDS = tuple(field.name for field in dataclasses.fields(Tokens))
HEARTBEAT = 1.0  # seconds between the child's signs of life


class EngineStopped(RuntimeError):
    """The engine's process is gone (it crashed, or was killed): nothing more can be answered."""


class EngineProcess:
    """A ChatEngine(model_path, **engine_options) in a spawned child process (spawn, not fork: the child starts clean
    of the parent's threads, and CUDA can only start in a fresh process)."""

    def __init__(self, model_path: str, threads: int | None = None, timeout: float = 900.0, silence_limit: float = 5.0,
                 **engine_options):
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(target=_child, args=(child_end, model_path, engine_options, threads), name="llava-engine",
                                        daemon=True)
        self._process.start()
        child_end.close()
        if not self._pipe.poll(timeout):
            self._process.kill()
            raise EngineStopped(f"the engine did not load the model in {timeout:g} s")
        try:
            kind, *detail = self._pipe.recv()
        except EOFError:
            self._process.join(5)
            raise EngineStopped(f"the engine's process stopped while loading the model (exit code {self._process.exitcode})") from None
        if kind != "ready":
            self._process.join(5)
            raise EngineStopped(f"the engine could not load {model_path}: {detail[0]}")
        (self.device, model_folder), self.alive = detail, True
        self.silence_limit, self._heard = silence_limit, time.monotonic()
        self._stats, self._stats_time = {}, time.monotonic()  # the engine's last snapshot (each heartbeat brings one)
        self._streams: dict[int, queue.SimpleQueue | StreamedAnswer] = {}  # request -> what its messages are put in
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        try:  # the processor of the folder the child loaded (a converted checkpoint's, or the hub's copy)
            self.prompter = Prompter(AutoProcessor.from_pretrained(model_folder, trust_remote_code=True))
        except Exception as error:
            self.close()
            raise EngineStopped(f"could not load the processor of {model_folder}: {type(error).__name__}: {error}") from None
        self.tokenizer = self.prompter.processor.tokenizer
        threading.Thread(target=self._read, name="llava-engine-reader", daemon=True).start()

    def generate(self, messages: list[dict], image, sampling: Sampling, session_id: str | None = None,
                 stop: tuple[str, ...] = (), interval: float = 0.0, prompting: dict | None = None):
        if session_id is not None:
            raise ValueError("sessions live in an in-process ChatEngine; API requests carry their whole conversation")
        return self._generate(messages, image, sampling, tuple(stop), interval, prompting or {})

    def _generate(self, messages, image, sampling: Sampling, stop: tuple[str, ...], interval: float, prompting: dict):
        prompt = self.prompter.prompt(messages, image, **prompting)  # ChatError at the first read, before the child hears of it
        yield from as_text(self._answer(lambda: prompt, sampling, interval), self.tokenizer, stop, chat_context(sampling, prompt), sampling)

    def complete(self, prompt: str | list[int] | Prompt, sampling: Sampling, stop: tuple[str, ...] = (), interval: float = 0.0):
        """ChatEngine.complete's: `prompt` continued as it is."""
        made = prompt if isinstance(prompt, Prompt) else self.prompter.text_prompt(prompt)
        return as_text(self._answer(lambda: made, sampling, interval), self.tokenizer, tuple(stop), continuation(made.ids[0].tolist()),
                       sampling)

    def answer(self, messages: list[dict], image, sampling: Sampling, loop: asyncio.AbstractEventLoop, stop: tuple[str, ...] = (),
               interval: float = 0.0, prompting: dict | None = None) -> "StreamedAnswer":
        """As generate, for a reader on the event loop `loop`: await each Progress with `StreamedAnswer.next`. Call
        it in a worker thread: it makes the prompt (ChatError here, before the child hears of it) and sends it on
        the pipe, which blocks while the pipe is full (a child that stopped reading)."""
        prompt = self.prompter.prompt(messages, image, **(prompting or {}))
        return self._stream(prompt, AnswerText(self.tokenizer, tuple(stop), chat_context(sampling, prompt), sampling), sampling, loop, interval)

    def answer_completion(self, prompt: str | list[int] | Prompt, sampling: Sampling, loop: asyncio.AbstractEventLoop,
                          stop: tuple[str, ...] = (), interval: float = 0.0) -> "StreamedAnswer":
        """As complete, for a reader on the event loop `loop` (see answer)."""
        made = prompt if isinstance(prompt, Prompt) else self.prompter.text_prompt(prompt)
        return self._stream(made, AnswerText(self.tokenizer, tuple(stop), continuation(made.ids[0].tolist()), sampling),
                            sampling, loop, interval)

    def _stream(self, prompt: Prompt, text: AnswerText, sampling: Sampling, loop: asyncio.AbstractEventLoop,
                interval: float) -> "StreamedAnswer":
        request = next(self._ids)
        answer = StreamedAnswer(self, request, text, loop)
        self._streams[request] = answer
        try:
            self._send(("generate", request, prompt, sampling, interval))
        except BaseException:
            self._streams.pop(request, None)
            raise
        return answer

    def _answer(self, make_prompt: Callable[[], Prompt], sampling: Sampling, interval: float) -> Iterator[Tokens]:
        prompt = make_prompt()  # ChatError at the first read, as ChatEngine.generate's, before the child hears of it
        request, arrivals = next(self._ids), queue.SimpleQueue()
        self._streams[request] = arrivals
        finished = False
        try:
            self._send(("generate", request, prompt, sampling, interval))
            while True:
                item = arrivals.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None  # its reader may stop here: nothing left to cancel
                yield item
                if finished:  # the child sends no "end" after a finish reason
                    return
        finally:
            self._streams.pop(request, None)
            if not finished and self.alive:
                try:
                    self._send(("cancel", request))
                except EngineStopped:  # it died meanwhile: nothing left to cancel
                    pass

    def responsive(self) -> bool:
        """Whether the child was heard from in the last `silence_limit` seconds (it beats every HEARTBEAT): alive is
        not enough, a process stopped by a signal or frozen is alive and answers nothing. /health asks this, so it
        waits for nothing: neither the pipe (a frozen child does not read it, and a send blocks once its buffer is
        full) nor a worker thread (the server's are all taken by answers under load)."""
        return self.alive and time.monotonic() - self._heard < self.silence_limit

    def stats(self) -> dict:
        """The engine's counts and state (ChatEngine.stats) as of its last heartbeat, and how old that is
        (`stats_age_seconds`, at most HEARTBEAT while it is responsive): asking the child would wait for it."""
        return {**self._stats, "stats_age_seconds": time.monotonic() - self._stats_time}

    def close(self):
        """Stops the child (at exit; answers in flight fail with EngineStopped)."""
        if self._process.is_alive():
            try:
                self._send(("stop",))
            except EngineStopped:
                pass
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()

    def _send(self, message):
        if not self.alive:
            raise EngineStopped(self._stopped())
        try:
            with self._send_lock:  # the server's threads send at once: one message at a time on the pipe
                self._pipe.send(message)
        except OSError:  # it died before the reader noticed (a broken pipe): the same answer as after
            raise EngineStopped(self._stopped()) from None

    def _read(self):
        """Hands each message of the child to the answer it belongs to; when the child is gone, fails them all."""
        try:
            while True:
                kind, request, *rest = self._pipe.recv()
                self._heard = time.monotonic()
                if kind == "beat":
                    self._stats, self._stats_time = rest[0], self._heard
                    continue
                arrivals = self._streams.get(request)
                if arrivals is None:  # cancelled meanwhile
                    continue
                if kind == "tokens":
                    arrivals.put(Tokens(*rest))
                elif kind == "end":
                    arrivals.put(_END)
                else:  # "error": the exception's class name and message
                    name, message = rest
                    arrivals.put(_ERRORS.get(name, RuntimeError)(message))
        except (EOFError, OSError):  # the child is gone
            pass
        except BaseException:  # a bug of ours: no answer may wait for a reader that is gone
            traceback.print_exc()
        finally:
            self.alive = False
            self._process.join(5)
            for arrivals in list(self._streams.values()):
                arrivals.put(EngineStopped(self._stopped()))

    def _stopped(self) -> str:
        return f"the engine's process stopped (exit code {self._process.exitcode})"


class StreamedAnswer:
    """One answer of the child, read on an event loop: the reader thread puts what arrives in an asyncio queue
    (`put`), `next` turns it into the next Progress. `answering` while the child may still be computing it (its
    last Progress not come, or cut short by a stop string): `close` then sends it a cancel, which can block."""

    def __init__(self, engine: EngineProcess, request: int, text: AnswerText, loop: asyncio.AbstractEventLoop):
        self._engine, self._request, self._text, self._loop = engine, request, text, loop
        self._arrivals: asyncio.Queue = asyncio.Queue()
        self.answering = True

    def put(self, item):
        """The reader thread's hand-over (Tokens, _END or an exception)."""
        try:
            self._loop.call_soon_threadsafe(self._arrivals.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server has stopped, nobody reads this answer
            pass

    async def next(self) -> Progress:
        item = await self._arrivals.get()
        if item is _END:  # the child ends an answer only after its last Tokens, or when it was cancelled
            item = RuntimeError("the engine ended the answer before its last tokens")
        if isinstance(item, BaseException):
            self.answering = False
            self.close()
            raise item
        if item.finish_reason is not None:
            self.answering = False
        progress = self._text.add(item)
        if not self.answering:
            self.close()  # nothing left to cancel: forgets it, no send
        return progress

    def close(self):
        self._engine._streams.pop(self._request, None)
        if self.answering:
            self.answering = False
            if self._engine.alive:
                try:
                    self._engine._send(("cancel", self._request))
                except EngineStopped:  # it died meanwhile: nothing left to cancel
                    pass


def compute_threads(requested: int | None = None) -> int:
    """Threads for the model's operators on the CPU: one core is left to the HTTP process (and the clients on the
    same machine). On two cores torch's default (2) made every parallel region wait for a core the web work held:
    the same requests streamed at half the speed at one stream and at eight."""
    if requested:
        return requested
    chosen = os.environ.get("OMP_NUM_THREADS", "")
    if chosen.isascii() and chosen.isdigit() and int(chosen) > 0:  # the operator's choice (OpenMP itself ignores what is not a count)
        return int(chosen)
    return max(1, len(os.sched_getaffinity(0)) - 1)


def _child(pipe, model_path: str, engine_options: dict, threads: int | None):
    """The child's main thread: loads the engine, then runs each request on a thread of its own (a reader of the
    scheduler, as the server's worker threads are in one process) and sends its Progress back."""
    # Ctrl-C and a service manager's SIGTERM reach the whole group: the parent, draining its requests, stops us in
    # order (or we see the pipe close when it is gone)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import torch

        from .chat import ChatEngine

        torch.set_num_threads(compute_threads(threads))

        engine = ChatEngine(model_path, **engine_options)
    except BaseException as error:  # the parent says what went wrong in one line
        if not isinstance(error, (ValueError, OSError)):  # not a wrong path or id: the traceback is for the log
            traceback.print_exc()
        pipe.send(("failed", f"{type(error).__name__}: {error}"))
        return
    send_lock, cancels = threading.Lock(), {}  # request -> its Event, set when the parent cancels it

    def send(message):
        with send_lock:
            pipe.send(message)

    def beat():  # a sign of life, with the engine's counts for /metrics
        while True:
            send(("beat", None, engine.stats()))
            time.sleep(HEARTBEAT)

    def answer(request, prompt, sampling, interval):
        try:
            arrivals = engine.answer_prompt(prompt, sampling, interval=interval, cancel=cancels[request])
            finished = False
            try:
                for item in arrivals:
                    if cancels[request].is_set():
                        break
                    send(("tokens", request, *(getattr(item, name) for name in TOKENS_FIELDS)))
                    finished = item.finish_reason is not None
            finally:
                arrivals.close()
            if not finished:  # a finish reason ends the answer for the parent already: no message more per answer
                send(("end", request))
        except BaseException as error:
            if isinstance(error, NonFiniteScores):  # the model's, not a bug: one line for the operator
                print(f"llava-engine: an answer failed: {error}", file=sys.stderr, flush=True)
            elif not isinstance(error, (ChatError, QueueFull)):
                traceback.print_exc()
            send(("error", request, type(error).__name__, str(error)))
        finally:
            cancels.pop(request, None)

    pipe.send(("ready", str(engine.device), engine.model_path))  # the parent prompts and detokenizes with its processor
    threading.Thread(target=beat, name="llava-heartbeat", daemon=True).start()
    while True:
        try:
            kind, *rest = pipe.recv()
        except EOFError:  # the parent is gone
            return
        if kind == "stop":
            return
        if kind == "cancel":
            if (cancel := cancels.get(rest[0])) is not None:  # else it has ended already
                cancel.set()
        elif kind == "generate":
            cancels[rest[0]] = threading.Event()
            threading.Thread(target=answer, args=rest, name=f"llava-request-{rest[0]}", daemon=True).start()
