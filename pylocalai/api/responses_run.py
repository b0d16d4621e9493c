"""One Open Responses run: turns the engine's events into output items and the spec's SSE events.

Every event gets the next sequence_number and goes to an in-memory log that live followers (the
request's own stream, or a resumed GET ?stream=true) read from; the run's response object is kept
up to date, and written to the store at each status change when the response is stored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import trio

from pylocalai.api.response_store import TERMINAL, ResponseStore
from pylocalai.engine.chat import AnswerDelta, AnswerStream
from pylocalai.engine.types import Finished, FinishReason, TextDelta, TokenLogprob


class ResponseRun:
    def __init__(self, response: dict[str, Any], input_items: list[dict[str, Any]], store: ResponseStore | None,
                 *, max_tool_calls: int | None = None) -> None:
        self.response = response
        self.input_items = input_items
        self.store = store
        self.events: list[dict[str, Any]] = []
        self.changed = trio.Condition()
        self.cancel_scope: trio.CancelScope | None = None
        self.max_tool_calls = max_tool_calls
        self._items: list[dict[str, Any]] = []  # output items in emission order
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._call_items: dict[int, dict[str, Any]] = {}

    @property
    def id(self) -> str:
        return str(self.response["id"])

    @property
    def done(self) -> bool:
        return self.response["status"] in TERMINAL

    # ------------------------------------------------------------ events

    async def emit(self, etype: str, **fields: Any) -> None:
        event = {"type": etype, "sequence_number": len(self.events), **fields}
        self.events.append(event)
        async with self.changed:
            self.changed.notify_all()

    def snapshot(self) -> dict[str, Any]:
        return {**self.response, "output": [dict(i) for i in self._items] if self._items else self.response["output"]}

    async def set_status(self, status: str, *, terminal_event: str | None = None, **fields: Any) -> None:
        """Change status (a cancelled response stays cancelled, whatever its worker does later); a
        terminal status also emits its event, and the store gets the run with that event in its log."""
        if self.response["status"] == "cancelled":
            return
        self.response.update(status=status, **fields)
        if status in TERMINAL and self.response.get("completed_at") is None and status != "failed":
            self.response["completed_at"] = int(time.time())
        if terminal_event is not None:
            await self.emit(terminal_event, response=self.snapshot())
        self.persist()

    def persist(self) -> None:
        if self.store is not None:
            self.store.put(self.snapshot(), self.input_items, self.events)

    async def follow(self, after: int) -> Any:
        """Events with sequence_number > after, then live ones until the run ends."""
        i = after + 1
        while True:
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.done:
                return
            async with self.changed:
                if i >= len(self.events) and not self.done:
                    await self.changed.wait()

    # ------------------------------------------------------------ items

    async def _close_open(self, status: str = "completed") -> None:
        item = self._open
        if item is None:
            return
        self._open = None
        idx = self._items.index(item)
        item["status"] = status
        if item["type"] == "message":
            part = item["content"][0]
            await self.emit("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                            text=part["text"], logprobs=part["logprobs"])
            await self.emit("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0, part=dict(part))
        elif item["type"] == "reasoning":
            part = item["content"][0]
            await self.emit("response.reasoning_text.done", item_id=item["id"], output_index=idx, content_index=0, text=part["text"])
            await self.emit("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0, part=dict(part))
        elif item["type"] == "function_call":
            await self.emit("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                            arguments=item["arguments"], name=item["name"])
        await self.emit("response.output_item.done", output_index=idx, item=dict(item))

    async def _open_item(self, item: dict[str, Any]) -> int:
        await self._close_open()
        self._items.append(item)
        self._open = item
        idx = len(self._items) - 1
        await self.emit("response.output_item.added", output_index=idx, item=dict(item, content=[]) if "content" in item else dict(item))
        if item["type"] == "message":
            await self.emit("response.content_part.added", item_id=item["id"], output_index=idx, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        elif item["type"] == "reasoning":
            await self.emit("response.content_part.added", item_id=item["id"], output_index=idx, content_index=0,
                            part={"type": "reasoning_text", "text": ""})
        return idx

    async def on_delta(self, d: AnswerDelta, logprobs: list[dict[str, Any]]) -> None:
        if d.reasoning:
            if self._open is None or self._open["type"] != "reasoning":
                await self._open_item({"type": "reasoning", "id": "rs_" + uuid.uuid4().hex, "status": "in_progress",
                                       "summary": [], "content": [{"type": "reasoning_text", "text": ""}]})
            item = self._open
            assert item is not None
            item["content"][0]["text"] += d.reasoning
            await self.emit("response.reasoning_text.delta", item_id=item["id"], output_index=self._items.index(item),
                            content_index=0, delta=d.reasoning)
        if d.content:
            if self._open is None or self._open["type"] != "message":
                await self._open_item({"type": "message", "id": "msg_" + uuid.uuid4().hex, "status": "in_progress",
                                       "role": "assistant", "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]})
            item = self._open
            assert item is not None
            item["content"][0]["text"] += d.content
            item["content"][0]["logprobs"].extend(logprobs)
            await self.emit("response.output_text.delta", item_id=item["id"], output_index=self._items.index(item),
                            content_index=0, delta=d.content, logprobs=logprobs)
        for c in d.calls or []:
            if c.id is not None:
                if self.max_tool_calls is not None and len(self._call_items) >= self.max_tool_calls:
                    continue
                item = {"type": "function_call", "id": "fc_" + uuid.uuid4().hex, "status": "in_progress",
                        "call_id": c.id, "name": c.name, "arguments": ""}
                self._call_items[c.index] = item
                await self._open_item(item)
            item = self._call_items.get(c.index)
            if item is not None and c.arguments:
                item["arguments"] += c.arguments
                await self.emit("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=self._items.index(item), delta=c.arguments)

    # ------------------------------------------------------------ the run

    async def run(self, answer: AnswerStream, events: Any, logprobs_of: Any, count_tokens: Any) -> None:
        """Drive one generation (events: the engine's channel) to a terminal status."""
        fin: Finished | None = None
        async for ev in events:
            if isinstance(ev, TextDelta):
                lps = logprobs_of(ev.logprobs) if ev.logprobs else []
                d = answer.feed(ev.text) if answer.mode == "plain" else await trio.to_thread.run_sync(answer.feed, ev.text)
                await self.on_delta(d, lps)
            else:
                fin = ev
                break
        assert fin is not None
        if fin.error is not None:
            raise fin.error
        await self.on_delta(await trio.to_thread.run_sync(answer.finish), [])
        incomplete = fin.reason is FinishReason.LENGTH
        await self._close_open("incomplete" if incomplete else "completed")
        reasoning = "".join(i["content"][0]["text"] for i in self._items if i["type"] == "reasoning")
        n_reasoning = await trio.to_thread.run_sync(count_tokens, reasoning) if reasoning else 0
        self.response["output"] = [dict(i) for i in self._items]
        self.response["usage"] = usage_json(fin, n_reasoning)
        if incomplete:
            await self.set_status("incomplete", terminal_event="response.incomplete", incomplete_details={"reason": "max_output_tokens"})
        else:
            await self.set_status("completed", terminal_event="response.completed")

    async def fail(self, message: str, code: str = "server_error") -> None:
        await self._close_open("incomplete")
        self.response["output"] = [dict(i) for i in self._items]
        if self.response["status"] == "cancelled":
            return
        await self.emit("error", code=code, message=message, param=None)
        await self.set_status("failed", terminal_event="response.failed", error={"code": code, "message": message})

    async def cancel(self) -> None:
        await self._close_open("incomplete")
        self.response["output"] = [dict(i) for i in self._items]
        await self.set_status("cancelled", terminal_event="response.cancelled")


def usage_json(fin: Finished, reasoning_tokens: int) -> dict[str, Any]:
    u = fin.usage
    return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens}}


def logprob_entries(llm: Any, lps: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    out = []
    for lp in lps:
        piece = llm.token_to_piece(lp.token)
        out.append({"token": piece.decode("utf-8", "replace"), "logprob": lp.logprob, "bytes": list(piece),
                    "top_logprobs": [{"token": (p := llm.token_to_piece(t)).decode("utf-8", "replace"), "logprob": v,
                                      "bytes": list(p)} for t, v in lp.top]})
    return out
