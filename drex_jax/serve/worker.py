"""One background thread owns the Engine and steps it; HTTP handlers talk to it only through a
thread-safe command queue and receive their request's token events on their own asyncio queue.

Nothing but this thread calls the engine (or its tokenizer), so a slow step never blocks the
event loop and a bad request is refused before it can touch the batch in flight."""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time

from drex_jax.generation import GenerationResult, RequestStats, StreamEvent
from drex_jax.serve.metrics import ServerMetrics
from drex_jax.serve.protocol import RequestError

log = logging.getLogger("drex_jax.serve")


@dataclasses.dataclass
class Submission:
    """One choice a handler asks for: `prompt` is text, token ids, or chat messages (`chat=True`);
    `max_tokens` None = up to the context limit, 0 = nothing generated (prompt scoring only);
    `make_config(max_new_tokens, default_temperature)` builds its GenerationConfig; `score_prompt`:
    also compute the prompt tokens' full-depth log-probabilities (`echo` with `logprobs`)."""
    prompt: str | list[int] | list[dict]
    chat: bool
    max_tokens: int | None
    make_config: object
    score_prompt: bool = False


class RequestHandle:
    """A submitted choice as its handler sees it: `index`, `request_id` (-1: nothing generated),
    `prompt_ids`, `prompt_logprobs` (when asked). Its events arrive on `events`, an asyncio queue
    it may share with the other choices of one response, as (handle, StreamEvent) pairs (the last
    has `finished`; an Exception ends it on failure)."""

    def __init__(self, worker: EngineWorker, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int = 0):
        self.worker, self.loop, self.events, self.index = worker, loop, events, index
        self.request_id = -1
        self.prompt_ids: list[int] = []
        self.prompt_logprobs: list | None = None
        self.done = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def deliver(self, item) -> None:  # called on the engine thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self, item))

    def cancel(self) -> None:
        """Cancel if unfinished (client gone): the slot and pages are freed on the next loop turn."""
        if not self.done:
            self.done = True
            self.worker.cancel(self.request_id)


class EngineWorker:
    """Owns `engine` on a daemon thread. `max_waiting`: requests queued beyond the engine's
    slots before `submit` refuses with 429."""

    def __init__(self, engine, metrics: ServerMetrics, max_waiting: int = 256, idle_poll_s: float = 0.05):
        if not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting must be an integer >= 0, got {max_waiting!r}")
        self.engine, self.metrics = engine, metrics
        self.capacity = engine.max_slots + max_waiting
        self._commands: queue.Queue = queue.Queue()
        self._handles: dict[int, RequestHandle] = {}  # engine request id -> handle (engine thread only)
        self._in_flight = 0  # accepted, not yet finished or cancelled
        self._lock = threading.Lock()
        self._idle_poll_s = idle_poll_s
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="drex-engine", daemon=True)

    # ------------------------------------------------------------------ handler side
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopping

    async def submit(self, subs: list[Submission]) -> list[RequestHandle]:
        """Queue the choices of one response, all or none; raises RequestError (400 bad input, 429
        queue full, 503 not serving) without touching any request in flight."""
        if not self.alive:
            raise RequestError("the engine is not serving (shutting down or failed)", status=503,
                               type="server_error")
        n = len(subs)
        with self._lock:
            if self._in_flight + n > self.capacity:
                self.metrics.requests.labels(outcome="rejected").inc(n)
                raise RequestError(f"server busy: {self._in_flight} requests in flight and {n} more asked (limit "
                                   f"{self.capacity}); retry later", status=429, type="rate_limit_error")
            self._in_flight += n
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        handles = [RequestHandle(self, loop, events, i) for i in range(n)]
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("submit", subs, handles, accepted))
        try:
            await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:  # the client left while the engine was taking the request
            accepted.add_done_callback(lambda f: f.cancelled() or f.exception() or [h.cancel() for h in f.result()])
            raise
        return handles

    def cancel(self, request_id: int) -> None:
        self._commands.put(("cancel", request_id))

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel whatever is still in flight, then end the thread."""
        self._commands.put(("stop",))
        self._thread.join(timeout)

    def _release(self, n: int = 1) -> None:
        with self._lock:
            self._in_flight -= n

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        eng = self.engine
        try:
            while True:
                if not self._handle_commands(block=not eng.has_work):
                    break
                if eng.has_work:
                    t0 = time.perf_counter()
                    events = eng.step()
                    self.metrics.step_seconds.observe(time.perf_counter() - t0)
                    for ev in events:
                        self._dispatch(ev)
                self.metrics.observe_engine(eng)
        except BaseException as e:  # an engine failure: every open request hears of it
            log.exception("engine step failed; the server stops serving")
            self.error = e
            for handle in self._handles.values():
                handle.deliver(RuntimeError(f"engine failure: {e}"))
            self._handles.clear()
        finally:
            self._stopping = True
            self._cancel_all()
            self.metrics.observe_engine(eng)

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued commands; False once asked to stop."""
        while True:
            try:
                cmd = self._commands.get(timeout=self._idle_poll_s) if block else self._commands.get_nowait()
            except queue.Empty:
                return True
            block = False
            if cmd[0] == "stop":
                return False
            if cmd[0] == "submit":
                self._submit(*cmd[1:])
            elif cmd[0] == "cancel":
                self._cancel(cmd[1])

    def _submit(self, subs: list[Submission], handles: list[RequestHandle],
                accepted: concurrent.futures.Future) -> None:
        """Check every choice, then queue them all (a refusal queues none)."""
        if not accepted.set_running_or_notify_cancel():  # the handler is already gone
            self._release(len(subs))
            return
        try:
            configs = [self._prepare(sub, h) for sub, h in zip(subs, handles)]
        except Exception as e:  # refused (bad input, a chat template that rejects the messages): nothing queued
            self._release(len(subs))
            if not isinstance(e, RequestError):
                field = "messages" if subs[0].chat else "prompt"
                if isinstance(e, ValueError):
                    e = RequestError(str(e), param=field)
                else:  # never hand an internal exception's text to the client
                    log.exception("request refused")
                    e = RequestError(f"{field} could not be processed (the tokenizer or chat template rejected it)",
                                     param=field)
            accepted.set_exception(e)
            return
        queued = []
        try:
            for h, config in zip(handles, configs):
                if config is not None:
                    h.request_id = self.engine.submit(h.prompt_ids, config)
                    queued.append(h)
        except ValueError as e:  # checked above, so not expected: refuse the whole response, keep serving
            log.exception("engine refused a checked request")
            for h in queued:
                self.engine.cancel(h.request_id)
            self._release(len(subs))
            accepted.set_exception(RequestError(f"request refused: {e}"))
            return
        for h, config in zip(handles, configs):
            if config is None:  # nothing to generate: the choice is its prompt (echo)
                h.done = True
                self._release()
                h.deliver(StreamEvent(-1, -1, "", True, GenerationResult(
                    -1, "", [], RequestStats(h.prompt_tokens, 0, 0.0, 0.0, 0.0, "length"), [], [])))
            else:
                self._handles[h.request_id] = h
        accepted.set_result(handles)

    def _prepare(self, sub: Submission, handle: RequestHandle):
        """Encode and check one choice (RequestError naming the field); its config, None when it
        generates nothing."""
        eng = self.engine
        ids = eng.encode_chat(sub.prompt) if sub.chat else eng.encode(sub.prompt)
        field = "messages" if sub.chat else "prompt"
        if not ids:
            raise RequestError(f"{field} encodes to no tokens; give at least one", param=field)
        room = eng.max_seq_len - len(ids)
        if room < (1 if sub.max_tokens != 0 else 0):
            raise RequestError(f"{field} is {len(ids)} tokens; the context limit is {eng.max_seq_len} tokens "
                               "(prompt + completion)", param=field)
        if sub.max_tokens is not None and sub.max_tokens > room:
            raise RequestError(f"max_tokens={sub.max_tokens} with a {len(ids)}-token prompt exceeds the context "
                               f"limit of {eng.max_seq_len} tokens: allowed range [1, {room}]", param="max_tokens")
        handle.prompt_ids = ids
        if sub.score_prompt:
            handle.prompt_logprobs = eng.score(ids)
        if sub.max_tokens == 0:
            return None
        config = sub.make_config(sub.max_tokens or room)
        try:
            eng.decoder.check_request(config)
        except ValueError as e:
            raise RequestError(str(e), param="logprobs" if config.logprobs is not None else None) from None
        return config

    def _cancel(self, request_id: int) -> None:
        handle = self._handles.pop(request_id, None)
        if handle is None:
            return  # finished before the cancel arrived
        result = self.engine.cancel(request_id)
        self._finished(result)

    def _dispatch(self, ev: StreamEvent) -> None:
        handle = self._handles.get(ev.request_id)
        if handle is None:
            return
        handle.deliver(ev)
        if ev.finished:
            del self._handles[ev.request_id]
            handle.done = True
            self._finished(ev.result)

    def _finished(self, result: GenerationResult) -> None:
        self._release()
        self.metrics.observe_result(result, self.engine.cfg.num_layers)

    def _cancel_all(self) -> None:
        for rid, handle in list(self._handles.items()):
            try:
                result = self.engine.cancel(rid)
            except ValueError:
                continue
            self._finished(result)
            handle.done = True
            handle.deliver(StreamEvent(rid, -1, "", True, result))
        self._handles.clear()
