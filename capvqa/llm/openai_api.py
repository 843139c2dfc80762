"""An OpenAI-compatible *completions* client (OpenAI, vLLM, TGI, llama.cpp server) on the standard library.

``POST {base_url}/completions`` with ``{"model", "prompt", "max_tokens", "temperature": 0, "logprobs": 1,
"stop": [...]}``, one request per prompt, at most ``concurrency`` in flight. The answer is
``choices[0].text`` (cut at the first stop string again, in case a server ignores ``stop``) and its
log-probability the sum of ``choices[0].logprobs.token_logprobs`` over the tokens that produced the kept
text (:func:`capvqa.llm.covering_prefix_length`; servers differ in whether they return the stop token).
The listed ``logprobs.tokens`` and ``token_logprobs`` are also kept whole, as the server sent them
(``Completion.generated_tokens``): PICa's ensemble score reads them the way its reference read
OpenAI's (:func:`capvqa.llm.logprob_until_newline`).
Whether a stop string ended the completion (``Completion.stopped``, which Img2LLM's answer rule reads)
comes from the response, since servers drop the stop string from the text (:func:`stopped_at_stop`).
A segmented prompt (:mod:`capvqa.llm`) is sent as its joined text: the server tokenises text, so the
BOS a local backend repeats at each segment cannot be sent.

Transient failures -- HTTP 429 and 5xx, refused or dropped connections, timeouts -- are retried with
exponential backoff and full jitter (a ``Retry-After`` header, in seconds, is honoured instead when
given), at most ``max_retries`` times; then a :class:`UserError` says which URL failed how. Other HTTP
errors (401, 404, 400: a wrong key, model name or request) are not retried, and redirects are not
followed (they would carry the key to another address).

The API key is read from the environment variable *named* in the config at construction and lives only
in this object's request headers: it is never part of a config, a cache key, a record, a log line or an
error message (server messages are scrubbed of it before they are shown).

**Images** (:class:`OpenAIChatVisionClient`, ``backend: openai`` of the VLM answer stage;
docs/methods.md#served-vision-language-models): ``POST {base_url}/chat/completions`` with one user
message whose ``content`` is the family's turn (:func:`capvqa.text.vlm_prompts.chat_messages`: the
image, then the text), the image as an ``image_url`` part holding a base64 data URL
(:func:`image_data_url`), as vLLM's server and hosted VLM APIs accept; ``temperature`` 0 and
``max_tokens``. The answer is ``choices[0].message.content``. Retries, timeouts, redirects and the key are
handled as for completions, by the same :class:`ApiConnection`.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate
from typing import Any

from capvqa.errors import ConfigError, UserError
from capvqa.llm import (
    Completion,
    GenerationSettings,
    Segments,
    VlmCompletion,
    VlmDecoding,
    check_greedy,
    check_segments,
    covering_prefix_length,
    cut_at_stop,
)

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 300.0  # a server asking for longer than this is treated as down
_MESSAGE_CHARS = 300


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: urllib would resend the Authorization header (the key) to wherever they point."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _Transient(Exception):
    """A failure worth retrying; ``retry_after`` is the server's requested wait, if any."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds (fractions accepted) or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds)


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max_s, base_s * 2**attempt)]."""
    return rng.uniform(0.0, min(max_s, base_s * (2**attempt)))


class ApiConnection:
    """POST JSON to one endpoint of an OpenAI-compatible server: the key header, bounded retries with
    backoff, timeouts, no redirects, error messages scrubbed of the key (see the module docstring).

    ``label`` names the API in messages ("LLM API", "VLM API").
    """

    def __init__(
        self,
        *,
        url: str,
        model: str,
        api_key_env: str,
        max_retries: int,
        timeout_s: float,
        backoff_base_s: float,
        backoff_max_s: float,
        label: str = "LLM API",
    ) -> None:
        key = os.environ.get(api_key_env, "").strip()
        if not key:
            raise UserError(
                f"the {label} key is read from the environment variable {api_key_env}, which is not set or "
                f"empty; export {api_key_env}=<your key> (or set api_key_env to the variable that holds it). "
                "Keys are never read from configs."
            )
        self.url = url
        self.model = model
        self.label = label
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._key = key
        self._rng = random.Random()
        self._rng_lock = threading.Lock()
        self._opener = urllib.request.build_opener(_NoRedirect)

    def __repr__(self) -> str:  # never show the key
        return f"ApiConnection(url={self.url!r}, model={self.model!r})"

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST with bounded retries; the parsed JSON response."""
        data = json.dumps(body).encode()
        attempts = self.max_retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                return self._post_once(data)
            except _Transient as error:
                last = error.reason
                if attempt + 1 == attempts:
                    break
                if error.retry_after is not None:
                    if error.retry_after > MAX_RETRY_AFTER_S:
                        last += f" (server asked to retry after {error.retry_after:.0f} s)"
                        break
                    delay = error.retry_after
                else:
                    with self._rng_lock:
                        delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, self._rng)
                log.warning(
                    "%s %s: %s; retry %d/%d in %.2f s",
                    self.label,
                    self.url,
                    last,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                time.sleep(delay)
        raise UserError(
            f"the {self.label} at {self.url} (model {self.model!r}) failed after {attempts} attempt(s): {last}. "
            "Check that the server is up and the model name is right, or raise max_retries / timeout_s."
        )

    def _post_once(self, data: bytes) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url,
            data=data,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json",
                "Authorization": f"Bearer {self._key}",
            },
        )
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            message = self.scrub(_read_error_body(error))
            reason = f"HTTP {error.code}" + (f": {message}" if message else "")
            if error.code in RETRY_STATUS:
                raise _Transient(reason, parse_retry_after(error.headers.get("Retry-After"))) from None
            raise UserError(f"the {self.label} at {self.url} refused the request ({reason})") from None
        except TimeoutError:
            raise _Transient(f"no response within timeout_s={self.timeout_s:g} s") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                raise _Transient(f"no response within timeout_s={self.timeout_s:g} s") from None
            raise _Transient(f"connection failed: {self.scrub(str(error.reason))}") from None
        except (ConnectionError, http.client.HTTPException) as error:
            raise _Transient(
                f"connection failed: {type(error).__name__}: {self.scrub(str(error))}"
            ) from None
        try:
            payload = json.loads(raw)
        except ValueError:
            raise _Transient(
                f"the response is not JSON: {self.scrub(raw[:_MESSAGE_CHARS].decode(errors='replace'))!r}"
            ) from None
        if not isinstance(payload, dict):
            raise UserError(f"the {self.label} at {self.url} answered with JSON that is not an object")
        return payload

    def scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def check_api_settings(base_url: str, concurrency: int, max_retries: int, timeout_s: float, label: str) -> None:
    """ConfigError for settings no request could work with (checked before the key is read)."""
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
    if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
        raise ConfigError(f"need concurrency >= 1, max_retries >= 0 and timeout_s > 0 for the {label}")


def run_concurrently(work: Callable[[int], Any], count: int, concurrency: int) -> list[Any]:
    """``[work(0), ..., work(count - 1)]`` with at most ``concurrency`` in flight, in order; the first
    failure cancels what has not started and is raised."""
    with ThreadPoolExecutor(max_workers=min(concurrency, count), thread_name_prefix="capvqa-api") as pool:
        futures = [pool.submit(work, i) for i in range(count)]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


class OpenAICompletionsClient:
    """Greedy completions from an OpenAI-compatible server; results aligned to the prompts."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 4,
        max_retries: int = 5,
        timeout_s: float = 60.0,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 30.0,
    ) -> None:
        check_api_settings(base_url, concurrency, max_retries, timeout_s, "LLM API")
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.concurrency = concurrency
        self.name = f"openai:{model}@{base_url.rstrip('/')}"
        self._connection = ApiConnection(
            url=self.url, model=model, api_key_env=api_key_env, max_retries=max_retries, timeout_s=timeout_s,
            backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s, label="LLM API",
        )
        self._warned_segments = False

    def __repr__(self) -> str:  # never show the key
        return f"OpenAICompletionsClient(url={self.url!r}, model={self.model!r})"

    def complete(
        self,
        prompts: Sequence[str],
        settings: GenerationSettings,
        segments: Sequence[Segments | None] | None = None,
    ) -> list[Completion]:
        """One completion per prompt, in order; raises UserError when a prompt fails for good.

        The API takes text, so a segmented prompt is sent as its joined text (the prompt itself): the
        server tokenises it once, and the extra BOS a local backend puts at each segment (Img2LLM's
        instruction) cannot be sent. A warning says so once per client.
        """
        if not prompts:
            return []
        if any(parts is not None for parts in check_segments(prompts, segments)) and not self._warned_segments:
            self._warned_segments = True
            log.warning(
                "LLM API %s: segmented prompts are sent as one text; the server tokenises them whole, so "
                "the BOS token a local backend repeats at each segment (Img2LLM's instruction) is not sent",
                self.url,
            )
        return run_concurrently(lambda i: self._complete_one(prompts[i], settings), len(prompts), self.concurrency)

    def _complete_one(self, prompt: str, settings: GenerationSettings) -> Completion:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": settings.max_new_tokens,
            "temperature": 0,
            "logprobs": 1,
        }
        if settings.stop:
            body["stop"] = list(settings.stop)
        return completion_from_response(self._post(body), settings.stop)

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST with bounded retries (:meth:`ApiConnection.post`); the parsed JSON response."""
        return self._connection.post(body)

    def close(self) -> None:
        """Nothing to release: connections are not pooled."""


def _read_error_body(error: urllib.error.HTTPError) -> str:
    try:
        raw = error.read()
    except (OSError, http.client.HTTPException):
        return ""
    try:
        payload = json.loads(raw)
        message = payload.get("error", payload) if isinstance(payload, dict) else payload
        if isinstance(message, dict):
            message = message.get("message", message)
        text = str(message)
    except ValueError:
        text = raw.decode(errors="replace")
    return " ".join(text.split())[:_MESSAGE_CHARS]


def completion_from_response(payload: dict[str, Any], stop: Sequence[str]) -> Completion:
    """The :class:`Completion` in a completions response (pure; see the module docstring)."""
    try:
        choice = payload["choices"][0]
        text = choice["text"]
    except (KeyError, IndexError, TypeError):
        raise UserError(
            f"the LLM API answered without choices[0].text (is it a /completions endpoint?): "
            f"{json.dumps(payload)[:_MESSAGE_CHARS]}"
        ) from None
    text, cut = cut_at_stop(str(text), stop)
    stopped = stopped_at_stop(choice, stop, cut)
    logprobs = choice.get("logprobs") or {}
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if not values:
        return Completion(text=text, logprob=None if text else 0.0, num_tokens=0, stopped=stopped)
    tokens = logprobs.get("tokens")
    listed: tuple[str, ...] | None = None
    if isinstance(tokens, list) and len(tokens) == len(values):
        kept = covering_prefix_length(list(accumulate(str(t) for t in tokens)), text)
        listed = tuple(str(t) for t in tokens)
    else:
        kept = len(values)
    total = sum(float(v) for v in values[:kept] if v is not None)
    listed_logprobs = None if listed is None else tuple(0.0 if v is None else float(v) for v in values)
    return Completion(
        text=text, logprob=total, num_tokens=kept, stopped=stopped, generated_tokens=listed,
        generated_logprobs=listed_logprobs,
    )


# TGI's finish reason for a stop string (besides the OpenAI schema's "stop", "length", "content_filter")
_STOP_STRING_FINISH = frozenset({"stop_sequence"})


def stopped_at_stop(choice: dict[str, Any], stop: Sequence[str], cut: bool) -> bool:
    """Whether the completion in ``choice`` ended at one of the ``stop`` strings (``Completion.stopped``).

    Servers drop the stop string from the text, so mostly the response has to say it:

    * the client's own cut found a stop string in the text (a server that ignores ``stop``): True;
    * no stop strings were sent: False (only ``max_tokens`` or end-of-sequence can have ended it);
    * ``finish_reason`` "length" (``max_tokens`` reached) or any other reason but "stop" (TGI's
      "eos_token", "content_filter"): False; TGI's "stop_sequence": True;
    * ``finish_reason`` "stop": in the OpenAI schema a stop string *or* the model's end-of-sequence. vLLM's
      server says which in ``stop_reason`` (the stop string; a stop token id or null for end-of-sequence):
      True only for a string. Without ``stop_reason`` it is taken as a stop string, the usual case for
      short answers with a newline among the stops; an end-of-sequence first is then misread (for
      Img2LLM's OK-VQA rule, the answer is lemmatised where the reference would not have);
    * no ``finish_reason``: True, as the server was asked to stop at the stop strings.
    """
    if cut:
        return True
    if not any(stop):
        return False
    finish = choice.get("finish_reason")
    if finish is None:
        return True
    if finish in _STOP_STRING_FINISH:
        return True
    if finish != "stop":
        return False
    if "stop_reason" in choice:
        return isinstance(choice["stop_reason"], str)
    return True


# ---------------------------------------------------------------------------------------------------
# Images: chat completions with image content

IMAGE_FORMATS = ("png", "jpeg")
JPEG_QUALITY = 95


def image_data_url(image: Any, image_format: str = "png") -> str:
    """``data:image/{png|jpeg};base64,...`` of a decoded RGB image.

    PNG (the default) is lossless, so the server decodes exactly the pixels a local backend reads; JPEG
    (quality 95) makes smaller requests at the price of a second lossy compression.
    """
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"unknown image_format {image_format!r}; choose one of: {', '.join(IMAGE_FORMATS)}")
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="PNG")
    return f"data:image/{image_format};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def vision_chat_body(model: str, data_url: str, text: str, decoding: VlmDecoding) -> dict[str, Any]:
    """The chat completions request of one image+text question (pure; see the module docstring).

    The user turn is the family's (:func:`capvqa.text.vlm_prompts.chat_messages`), its image part an
    ``image_url`` with ``data_url``; ``newline_ends`` becomes the stop string ``"\n"``.
    """
    from capvqa.text.vlm_prompts import chat_messages

    messages = []
    for message in chat_messages(text):
        content = [
            {"type": "image_url", "image_url": {"url": data_url}} if part["type"] == "image" else dict(part)
            for part in message["content"]
        ]
        messages.append({"role": message["role"], "content": content})
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": decoding.max_new_tokens,
        "temperature": 0,
        "n": 1,
    }
    if decoding.newline_ends:
        body["stop"] = ["\n"]
    return body


def vlm_completion_from_chat(payload: dict[str, Any], stop: Sequence[str] = ()) -> VlmCompletion:
    """The :class:`VlmCompletion` in a chat completions response (pure).

    ``choices[0].message.content`` is a string, a list of text parts (joined) or null (no text: "");
    cut at ``stop`` again in case a server ignored it. ``num_tokens`` is ``usage.completion_tokens``
    (0 when the server reports no usage).
    """
    try:
        message = payload["choices"][0]["message"]
        content = message.get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise UserError(
            "the VLM API answered without choices[0].message (is it a /chat/completions endpoint?): "
            f"{json.dumps(payload)[:_MESSAGE_CHARS]}"
        ) from None
    if isinstance(content, list):
        content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    text, _ = cut_at_stop("" if content is None else str(content), stop)
    usage = payload.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return VlmCompletion(text=text, num_tokens=int(tokens) if isinstance(tokens, int) else 0)


class OpenAIChatVisionClient:
    """Short answers about images from an OpenAI-compatible chat completions server; results aligned."""

    model_type = None  # the server's model family is not known here

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 4,
        max_retries: int = 5,
        timeout_s: float = 60.0,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 30.0,
        image_format: str = "png",
    ) -> None:
        check_api_settings(base_url, concurrency, max_retries, timeout_s, "VLM API")
        if image_format not in IMAGE_FORMATS:
            raise ConfigError(f"unknown image_format {image_format!r}; choose one of: {', '.join(IMAGE_FORMATS)}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.concurrency = concurrency
        self.image_format = image_format
        self.name = f"openai:{model}@{base_url.rstrip('/')}"
        self._connection = ApiConnection(
            url=self.url, model=model, api_key_env=api_key_env, max_retries=max_retries, timeout_s=timeout_s,
            backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s, label="VLM API",
        )

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIChatVisionClient(url={self.url!r}, model={self.model!r})"

    def render(self, fmt: Any, question: str) -> str:
        """The user turn's text: the family's question text; the server applies its chat template."""
        from capvqa.text.vlm_prompts import question_text

        return question_text(fmt, question)

    def generate(self, images: Sequence[Any], prompts: Sequence[str], decoding: VlmDecoding) -> list[VlmCompletion]:
        """One greedy answer per (image, prompt), in order, at most ``concurrency`` requests in flight;
        raises UserError when a request fails for good."""
        check_greedy(decoding, "openai")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        if not prompts:
            return []
        stop = ("\n",) if decoding.newline_ends else ()

        def answer(i: int) -> VlmCompletion:
            body = vision_chat_body(self.model, image_data_url(images[i], self.image_format), prompts[i], decoding)
            return vlm_completion_from_chat(self._connection.post(body), stop)

        return run_concurrently(answer, len(prompts), self.concurrency)

    def close(self) -> None:
        """Nothing to release: connections are not pooled."""
