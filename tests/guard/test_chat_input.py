"""The guard's gate for client messages: every bad input is an InputError naming the field, images are checked
against the limits (pixels from the header, before decoding), files only under the allowed roots, and file
images are forwarded as data URLs of the same bytes."""
from __future__ import annotations

import base64
import hashlib
import http.server
import io
import threading
import zlib

import pytest
from PIL import Image

from misguard.guard.chat_input import InputError, parse_chat_messages
from misguard.guard.policy import Limits


def png_bytes(width: int = 8, height: int = 6, color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def refused(messages, limits: Limits | None = None) -> InputError:
    with pytest.raises(InputError) as caught:
        parse_chat_messages(messages, limits or Limits())
    assert caught.value.status_code == 400
    return caught.value


@pytest.fixture()
def roots(tmp_path):
    """(allowed root with a.png in it, a folder outside it with secret.png in it)."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "a.png").write_bytes(png_bytes(5, 7, "blue"))
    (outside / "secret.png").write_bytes(png_bytes(3, 3, "green"))
    return allowed, outside


def test_data_url_image_is_decoded_and_forwarded_as_sent():
    data = png_bytes(8, 6)
    messages = [{"role": "system", "content": "Be brief."}, user(text("What is this?"), image_part(data_url(data)))]
    chat = parse_chat_messages(messages, Limits())
    assert chat.forward_messages == messages
    assert len(chat.images) == 1 and chat.images[0].size == (8, 6) and chat.images[0].mode == "RGB"
    info = chat.image_info[0]
    assert (info.sha256, info.bytes, info.width, info.height, info.format) == (
        hashlib.sha256(data).hexdigest(), len(data), 8, 6, "PNG")
    assert chat.messages[1]["content"][1] == {"type": "image", "image": chat.images[0]}
    assert chat.question == "What is this?"


def test_plain_string_content():
    chat = parse_chat_messages([{"role": "user", "content": "hello there"}], Limits())
    assert chat.messages == [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    assert chat.forward_messages == [{"role": "user", "content": "hello there"}]
    assert chat.question == "hello there" and chat.images == []


def test_question_is_the_last_user_turns_text():
    chat = parse_chat_messages([
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        user(text("second"), image_part(data_url(png_bytes())), text("question")),
        {"role": "assistant", "content": None},
    ], Limits())
    assert chat.question == "second\nquestion"
    assert chat.messages[-1] == {"role": "assistant", "content": [{"type": "text", "text": ""}]}


def test_developer_role_is_a_system_turn_for_the_judge():
    chat = parse_chat_messages([{"role": "developer", "content": "rules"}, {"role": "user", "content": "hi"}],
                               Limits())
    assert chat.messages[0]["role"] == "system" and chat.forward_messages[0]["role"] == "developer"


def test_legacy_string_image_url_is_read_and_forwarded_as_an_object():
    url = data_url(png_bytes(4, 4))
    chat = parse_chat_messages([user({"type": "image_url", "image_url": url}, text("hi"))], Limits())
    assert chat.images[0].size == (4, 4)
    assert chat.forward_messages[0]["content"][0] == image_part(url)


@pytest.mark.parametrize("messages, param, code", [
    ([], "messages", "invalid_request"),
    ("hello", "messages", "invalid_request"),
    (["hello"], "messages.0", "invalid_request"),
    ([{"role": "wizard", "content": "hi"}], "messages.0.role", "invalid_request"),
    ([{"content": "hi"}], "messages.0.role", "invalid_request"),
    ([{"role": "user", "content": 5}], "messages.0.content", "invalid_request"),
    ([{"role": "user", "content": None}], "messages.0.content", "invalid_request"),
    ([user(text("hi"), {"type": "input_audio", "input_audio": {}})], "messages.0.content.1.type",
     "invalid_request"),
    ([user("not a part")], "messages.0.content.0.type", "invalid_request"),
    ([user({"type": "text", "text": 3})], "messages.0.content.0.text", "invalid_request"),
    ([{"role": "system", "content": "rules"}, {"role": "assistant", "content": "hi"}], "messages",
     "invalid_request"),
    ([user(text("hi"), {"type": "image_url", "image_url": {}})], "messages.0.content.1.image_url.url",
     "invalid_request"),
    ([user({"type": "image", "image": 42})], "messages.0.content.0.image", "invalid_request"),
])
def test_malformed_messages(messages, param, code):
    error = refused(messages)
    assert (error.param, error.code) == (param, code)


@pytest.mark.parametrize("url", [
    "data:image/png;base64,!!!not base64!!!",
    "data:image/png;base64,iVBORw0KGgo",  # base64 without the padding it needs
    "data:image/png," + "x" * 8,  # not base64 at all
    data_url(b"plain text, not an image"),
    data_url(png_bytes()[:40]),  # a PNG cut off inside its pixel data
    "ftp2://example/a.png",
])
def test_bad_image_data(url):
    error = refused([user(text("hi"), image_part(url))])
    assert (error.param, error.code) == ("messages.0.content.1.image_url.url", "invalid_image")


@pytest.mark.parametrize("scheme", ["http", "https", "ftp"])
def test_remote_urls_are_refused_and_never_fetched(scheme):
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png_bytes())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"{scheme}://127.0.0.1:{server.server_address[1]}/a.png"
        error = refused([{"role": "system", "content": "x"}, user(image_part(url))])
    finally:
        server.shutdown()
        server.server_close()
    assert (error.param, error.code) == ("messages.1.content.0.image_url.url", "remote_image")
    assert hits == []


def test_image_over_the_byte_limit():
    data = png_bytes(64, 64, "white")
    limits = Limits(max_image_bytes=len(data) - 1)
    error = refused([user(text("hi"), image_part(data_url(data)))], limits)
    assert (error.param, error.code) == ("messages.0.content.1.image_url.url", "image_too_large")
    assert parse_chat_messages([user(image_part(data_url(data)))], Limits(max_image_bytes=len(data))).images


def test_huge_base64_payload_is_refused_before_decoding():
    # Invalid base64 far over the limit: the size check comes first, so it is "too large", not "invalid".
    error = refused([user(image_part("data:image/png;base64," + "!" * 4000))], Limits(max_image_bytes=1000))
    assert error.code == "image_too_large"


def test_image_over_the_pixel_limit():
    data = png_bytes(5000, 5000, "black")  # a few KiB of PNG, 25 megapixels decoded
    assert len(data) < 1_000_000
    error = refused([user(text("hi"), image_part(data_url(data)))], Limits(max_image_pixels=1_000_000))
    assert (error.param, error.code) == ("messages.0.content.1.image_url.url", "image_too_large")
    assert "5000x5000" in error.message


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # The header says 5000x5000 but the pixel data is cut off: decoding would fail ("invalid_image"), so
    # "image_too_large" shows the refusal came from the header alone.
    header_only = png_bytes(5000, 5000, "black")[:200]
    error = refused([user(image_part(data_url(header_only)))], Limits(max_image_pixels=1_000_000))
    assert error.code == "image_too_large"
    assert refused([user(image_part(data_url(header_only)))], Limits(max_image_pixels=30_000_000)).code == (
        "invalid_image")


def test_decompression_bomb_is_too_large_not_unreadable():
    # PIL itself refuses a 20000x20000 header (over twice its MAX_IMAGE_PIXELS) while opening it.
    small = png_bytes(1, 1, "black")
    ihdr = b"IHDR" + (20000).to_bytes(4, "big") * 2 + small[24:29]  # same bit depth, colour type, ...
    bomb = small[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + small[33:]
    error = refused([user(image_part(data_url(bomb)))], Limits(max_image_pixels=10**9))
    assert error.code == "image_too_large"


def test_too_many_images():
    url = data_url(png_bytes())
    messages = [user(image_part(url), text("a")), {"role": "assistant", "content": "ok"},
                user(image_part(url), image_part(url))]
    error = refused(messages, Limits(max_images=2))
    assert (error.param, error.code) == ("messages.2.content.1", "too_many_images")
    assert len(parse_chat_messages(messages, Limits(max_images=3)).images) == 3
    assert refused([user(image_part(url))], Limits(max_images=0)).code == "too_many_images"


def test_allowed_file_is_forwarded_as_a_data_url_of_its_bytes(roots):
    allowed, _ = roots
    file_bytes = (allowed / "a.png").read_bytes()
    for url in (str(allowed / "a.png"), f"file://{allowed / 'a.png'}"):
        chat = parse_chat_messages([user(text("look"), image_part(url))], Limits(allowed_image_roots=[allowed]))
        forwarded = chat.forward_messages[0]["content"][1]["image_url"]["url"]
        header, _, payload = forwarded.partition(",")
        assert header == "data:image/png;base64" and base64.b64decode(payload) == file_bytes
        assert chat.images[0].size == (5, 7)
        assert chat.image_info[0].sha256 == hashlib.sha256(file_bytes).hexdigest()
        assert chat.image_info[0].bytes == len(file_bytes)


@pytest.mark.parametrize("host", ["example.com", "127.0.0.1", "otherhost:8000"])
def test_file_url_naming_another_host_is_refused(roots, host):
    allowed, _ = roots
    error = refused([user(text("look"), image_part(f"file://{host}{allowed / 'a.png'}"))],
                    Limits(allowed_image_roots=[allowed]))
    assert (error.param, error.code) == ("messages.0.content.1.image_url.url", "remote_image")
    assert host in error.message
    for own in (f"file://localhost{allowed / 'a.png'}", f"file://{allowed / 'a.png'}"):
        assert parse_chat_messages([user(image_part(own))], Limits(allowed_image_roots=[allowed])).images


def test_conversation_is_every_user_and_assistant_turn_and_question_the_last_user_turn():
    chat = parse_chat_messages([
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "tool", "content": "tool output"},
        user(text("second"), image_part(data_url(png_bytes())), text("question")),
        {"role": "assistant", "content": None},
    ], Limits())
    assert chat.question == "second\nquestion"
    assert chat.conversation == "User: first question\n\nAssistant: an answer\n\nUser: second\nquestion"
    alone = parse_chat_messages([{"role": "system", "content": "rules"}, {"role": "user", "content": "hi"}], Limits())
    assert alone.conversation == alone.question == "hi"


def test_file_url_with_escaped_characters(roots):
    allowed, _ = roots
    (allowed / "my image.png").write_bytes(png_bytes(2, 9))
    chat = parse_chat_messages([user(image_part(f"file://{allowed}/my%20image.png"))],
                               Limits(allowed_image_roots=[allowed]))
    assert chat.images[0].size == (2, 9)


def test_file_images_need_an_allowed_root(roots):
    allowed, outside = roots
    error = refused([user(image_part(str(allowed / "a.png")))])
    assert (error.param, error.code) == ("messages.0.content.0.image_url.url", "image_path_not_allowed")
    limits = Limits(allowed_image_roots=[allowed])
    for url in (str(outside / "secret.png"), f"file://{outside / 'secret.png'}",
                f"{allowed}/../outside/secret.png"):
        assert refused([user(image_part(url))], limits).code == "image_path_not_allowed"


def test_symlink_under_an_allowed_root_pointing_outside_is_refused(roots):
    allowed, outside = roots
    (allowed / "link.png").symlink_to(outside / "secret.png")
    (allowed / "linked-folder").symlink_to(outside, target_is_directory=True)
    limits = Limits(allowed_image_roots=[allowed])
    for path in (allowed / "link.png", allowed / "linked-folder" / "secret.png"):
        error = refused([user(image_part(str(path)))], limits)
        assert (error.param, error.code) == ("messages.0.content.0.image_url.url", "image_path_not_allowed")
    assert parse_chat_messages([user(image_part(str(outside / "secret.png")))],
                               Limits(allowed_image_roots=[outside])).images


def test_missing_or_oversized_file(roots):
    allowed, _ = roots
    assert refused([user(image_part(str(allowed / "nope.png")))],
                   Limits(allowed_image_roots=[allowed])).code == "invalid_image"
    assert refused([user(image_part(str(allowed / "a.png")))],
                   Limits(allowed_image_roots=[allowed], max_image_bytes=10)).code == "image_too_large"


def test_internal_format_image_parts(roots):
    allowed, _ = roots
    pil = Image.new("RGBA", (6, 4), (255, 0, 0, 128))
    chat = parse_chat_messages([user({"type": "image", "image": pil}, {"type": "image", "image": allowed / "a.png"},
                                     text("what are these?"))], Limits(allowed_image_roots=[allowed]))
    assert [image.size for image in chat.images] == [(6, 4), (5, 7)]
    assert all(image.mode == "RGB" for image in chat.images)
    forwarded = chat.forward_messages[0]["content"]
    assert [part["type"] for part in forwarded] == ["image_url", "image_url", "text"]
    assert base64.b64decode(forwarded[1]["image_url"]["url"].partition(",")[2]) == (allowed / "a.png").read_bytes()
    decoded = Image.open(io.BytesIO(base64.b64decode(forwarded[0]["image_url"]["url"].partition(",")[2])))
    assert decoded.size == (6, 4)
    assert chat.question == "what are these?"


def test_internal_format_image_limits_and_roots(roots):
    allowed, _ = roots
    error = refused([user({"type": "image", "image": Image.new("RGB", (100, 100))})], Limits(max_image_pixels=9999))
    assert (error.param, error.code) == ("messages.0.content.0.image", "image_too_large")
    error = refused([user({"type": "image", "image": str(allowed / "a.png")})])
    assert (error.param, error.code) == ("messages.0.content.0.image", "image_path_not_allowed")


def test_param_prefix_is_configurable():
    with pytest.raises(InputError) as caught:
        parse_chat_messages([{"role": "user", "content": 1}], Limits(), param="body.messages")
    assert caught.value.param == "body.messages.0.content"
