"""`tokenmill chat` and `tokenmill complete`: small terminal clients of a running server (as `vllm chat`).

Both use the openai SDK, print "Using model: M", then read prompts after `> ` and stream the replies;
`-q MSG` sends one message and exits. EOF or Ctrl-C ends the session.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

DEFAULT_URL = "http://localhost:8000/v1"


def make_parser(kind: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"tokenmill {kind}",
        description=f"{'Chat' if kind == 'chat' else 'Complete text'} with an OpenAI-compatible server.",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the server's API URL (default: {DEFAULT_URL})")
    parser.add_argument("--model-name", default=None, help="model to use (default: the server's first)")
    parser.add_argument(
        "--api-key", default=None, help="API key (default: VLLM_API_KEY or TOKENMILL_API_KEY)"
    )
    parser.add_argument(
        "-q", "--quick", metavar="MSG", default=None, help="send one message, print the reply, exit"
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="most tokens per reply")
    if kind == "chat":
        parser.add_argument("--system-prompt", default=None, help="a system message to start the chat with")
    return parser


def api_url(url: str) -> str:
    """The base URL the SDK needs: http://host:port becomes http://host:port/v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def main(kind: str, argv: list[str]) -> int:
    import openai

    from tokenmill.entrypoints.cli_args import api_key_from_env

    args = make_parser(kind).parse_args(argv)
    url = api_url(args.url)
    client = openai.OpenAI(base_url=url, api_key=args.api_key or api_key_from_env() or "EMPTY", max_retries=0)
    try:
        model = args.model_name or client.models.list().data[0].id
        print(f"Using model: {model}", flush=True)
        session = ChatSession(client, model, args) if kind == "chat" else CompleteSession(client, model, args)
        if args.quick is not None:
            session.send(args.quick)
            return 0
        return interact(session.send, on_error=lambda err: print(f"\n{describe(err)}", file=sys.stderr))
    except openai.APIConnectionError:
        print(
            f"\ncannot reach a server at {url}: is `tokenmill serve` running there? (see --url)",
            file=sys.stderr,
        )
    except openai.AuthenticationError:
        print(
            f"\nthe server at {url} rejected the API key: pass the right one with --api-key", file=sys.stderr
        )
    except openai.APIError as err:
        print(f"\n{describe(err)}", file=sys.stderr)
    return 1


def describe(err: Any) -> str:
    """One line for an error the server reported: an HTTP status, or an error event mid-stream."""
    import openai

    if isinstance(err, openai.APIStatusError):
        if err.response.headers.get("X-Portal-Placeholder") == "true":
            return f"the server is not ready yet ({err.status_code} from the portal): try again in a moment"
        return f"the server answered {err.status_code}: {_error_message(err)}"
    return f"the server reported an error: {err.message}"


def interact(send: Callable[[str], None], on_error: Callable[[Exception], None] | None = None) -> int:
    """Reads lines and sends each; an error the server reports for one line is shown and the session goes
    on (a connection failure ends it)."""
    import openai

    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        try:
            send(line)
        except KeyboardInterrupt:
            print()
            return 0
        except openai.APIConnectionError:
            raise
        except openai.APIError as err:
            if on_error is None:
                raise
            on_error(err)


class ChatSession:
    """A conversation: every exchange is kept and sent with the next message."""

    def __init__(self, client: Any, model: str, args: argparse.Namespace) -> None:
        self.client, self.model, self.max_tokens = client, model, args.max_tokens
        self.messages: list[dict[str, str]] = []
        if args.system_prompt:
            self.messages.append({"role": "system", "content": args.system_prompt})

    def send(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        extra = {"max_tokens": self.max_tokens} if self.max_tokens is not None else {}
        parts = []
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=self.messages, stream=True, **extra
            )
            for chunk in stream:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    parts.append(delta)
                    print(delta, end="", flush=True)
        except BaseException:
            self.messages.pop()  # a message that got no answer is not part of the conversation
            raise
        print()
        self.messages.append({"role": "assistant", "content": "".join(parts)})


class CompleteSession:
    """Each line is completed on its own."""

    def __init__(self, client: Any, model: str, args: argparse.Namespace) -> None:
        self.client, self.model, self.max_tokens = client, model, args.max_tokens

    def send(self, text: str) -> None:
        stream = self.client.completions.create(
            model=self.model,
            prompt=text,
            stream=True,
            max_tokens=64 if self.max_tokens is None else self.max_tokens,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                print(chunk.choices[0].text, end="", flush=True)
        print()


def _error_message(err: Any) -> str:
    body = err.body if isinstance(err.body, dict) else {}
    error = body.get("error", body)
    return str(error.get("message", err.message)) if isinstance(error, dict) else str(err.message)
