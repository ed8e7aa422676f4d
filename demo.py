"""
An interactive demo in the browser, and the same model as a small JSON API:

    python demo.py --out_dir=out-phantom             # then open the URL it prints
    python demo.py --out_dir=out-phantom --port=0    # any free port
    curl --data-binary @xray.png http://127.0.0.1:8000/api/report
    curl --data-binary @xray.png 'http://127.0.0.1:8000/api/report?indication=Cough.'   # trained with context

The page (demo.html) sends a PNG or JPEG, uploaded or one of a few examples, and
shows the report, the 14 condition probabilities against their thresholds, the gate
and the 20 queries' attention maps; for a checkpoint trained with clinical context,
the reports with and without an optional indication side by side. POST /api/report
takes the raw image bytes as the request body and answers JSON; a bad request gets
a 4xx {"error": ...} that names the problem. Standard library only: the model
loads once, a lock runs one request at a time through it, uploads stay in memory,
and the only things a request can read are the page and the examples, by index.
A burst of uploads is queued, up to max_queue at once, each waiting at most
max_wait seconds for the model; the others get a 503 with Retry-After. The access
log holds the method, the path and the status: never the query string, where the
indication (clinical text) comes.
"""
import base64
import io
import json
import math
import os
import re
import socket
import sys
import threading
import time
import traceback
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import torch
from PIL import Image

import data
import hardware
from chexpert import CONDITIONS
from checkpoint import decision_thresholds, load_checkpoint
from chexquery import GENERATION
from heatmaps import attention_grid
from metrics import decide

# -----------------------------------------------------------------------------
out_dir = 'out'               # holds ckpt.safetensors
ckpt = ''                     # a specific checkpoint file instead of out_dir/ckpt.safetensors
host = '127.0.0.1'            # another address serves everyone who can reach it, and there is no authentication
port = 8000                   # 0: any free port (the URL is printed)
examples = ''                 # a directory of PNG/JPEG examples; '': a phantom-trained run's own test images
n_examples = 10
threshold = 0.0               # 0: the checkpoint's per-condition thresholds (chosen on val); else one for all
max_upload_mb = 20            # a larger request body is refused before it is read
max_pixels = 6000 * 6000      # a larger image is refused from its header, before it is decoded
max_indication = 500          # characters
max_queue = 8                 # uploads held at once (being read, waiting or in the model); more get a 503 at once
max_wait = 60                 # seconds an upload may wait for the model; then a 503
device = 'auto'
dtype = 'auto'
cpu_kernels = False           # True: hardware.py's CPU speed-ups (oneDNN linears, kept freed memory, lean beam cache)
globals().update(GENERATION)  # num_beams, max_length, ... : the model's defaults, overridable here
# -----------------------------------------------------------------------------
RELEASE_AFTER = 2**20         # bytes of an upload after which its freed memory is handed back to the OS
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo.html')
EXAMPLE = re.compile(r'/example/([0-9]{1,4})')  # an index, never a name: no request can name a file
LOCAL_HOSTS = ('127.0.0.1', 'localhost', '::1')
TYPES = {'PNG': 'image/png', 'JPEG': 'image/jpeg'}  # the decoders PIL may use
# what PIL's JPEG decoder may call an image: MPO, a JPEG with more frames after the first (phones, stereo cameras)
CONTENT_TYPES = dict(TYPES, MPO='image/jpeg')
BACKLOG = 128                 # connections the kernel holds before they are accepted: a burst of uploads fits


class RequestError(Exception):
    """A request the demo cannot serve: its HTTP status and a message naming the problem."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def decode_image(body, limit=None):
    """An RGB PIL image from an upload's bytes, PNG or JPEG only (PIL's other decoders are
    never reached). Raises RequestError: 400 for what is not a readable image, 413 for an
    image of more than `limit` pixels (default max_pixels), checked from its header."""
    limit = limit or max_pixels
    if not body:
        raise RequestError(400, "the upload is empty (0 bytes): send a PNG or JPEG image as the request body")
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its own pixel limit: make every bomb an error
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body), formats=tuple(TYPES)) as im:
                w, h = im.size
                if w * h > limit:
                    raise RequestError(413, f"the image claims {w} x {h} = {w * h:,} pixels, over the limit of "
                                            f"{limit:,} (a decompression bomb?)")
                im.load()
                return data.to_rgb(im)
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(413, f"the image is too large to decode ({e})") from None
    except Image.UnidentifiedImageError:
        raise RequestError(400, f"the upload is not a PNG or JPEG image ({len(body):,} bytes starting "
                                f"{body[:8]!r})") from None
    except Exception as e:  # anything else PIL raises comes from the bytes: truncated, corrupt, ...
        raise RequestError(400, f"the upload is not a readable image ({type(e).__name__}: {e})") from None


def example_images(config, directory, n):
    """[(bytes, description)] of up to n examples, read once at start: the PNG/JPEG files of
    `directory`, or else the test images of a phantom-trained run (one per new set of
    findings, so they differ)."""
    if directory:
        records = [dict(id=os.path.basename(f), path=f) for f in data.image_files(directory, ('.png', '.jpg', '.jpeg'))]
    elif config.get('dataset') == 'phantom' and os.path.isfile(os.path.join(config['data_dir'], 'test.jsonl')):
        seen, records = set(), []
        for r in data.read_split(config['data_dir'], 'test'):
            findings = tuple(c for c, v in zip(CONDITIONS, r['labels']) if v == 1)
            if findings not in seen:
                seen.add(findings)
                records.append(dict(r, path=os.path.join(config['data_dir'], r['image']),
                                    findings=', '.join(findings) or 'none'))
    else:
        return []
    chosen = []
    for r in records:
        if len(chosen) == n:
            break
        problem = data.file_problem(r['path'])  # before open: a FIFO would block the start for ever
        if problem:
            print(f"warning: example {r['path']} left out: {problem}", file=sys.stderr)
            continue
        with open(r['path'], 'rb') as f:
            body = f.read()
        try:
            kind = Image.open(io.BytesIO(body), formats=tuple(TYPES)).format
        except Exception as e:
            print(f"warning: example {r['path']} left out: not a readable PNG or JPEG ({e})", file=sys.stderr)
            continue
        chosen.append((body, dict(id=r['id'], type=CONTENT_TYPES[kind], findings=r.get('findings', ''),
                                  indication=r.get('indication', ''), reference=r.get('report', ''))))
    return chosen


class Demo:
    """The model, loaded once, and what a request runs through it."""

    def __init__(self, path, dev='cpu', dtype='auto', cpu_kernels=False, generation=None, threshold=0.0,
                 examples_dir='', n_examples=10, max_queue=8, max_wait=60):
        self.model, meta = load_checkpoint(path, dev, merge_lora=True)
        if dev == 'cpu' and cpu_kernels:
            hardware.use_cpu_kernels(self.model)
        self.config = meta['config']
        self.tok = data.run_tokenizer(self.config)
        data.check_tokenizer(self.tok, self.model.t5.config, path, meta.get('tokenizer'))
        self.context = bool(self.config.get('context'))  # trained with the indication ahead of the prompt
        self.dev, self.dtype = dev, hardware.resolve_dtype(dtype, dev)
        self.transform = data.eval_transform(self.model.cfg.image_size)
        self.prompt = data.section_prompt(self.config.get('target', 'both'))  # 'Findings:' or 'Impression:'
        self.generation = dict(GENERATION, **(generation or {}))
        self.thresholds, self.thresholds_from = decision_thresholds(meta, threshold)
        self.diagnosis = data.check_diagnosis(None, self.config, path)  # the head's decisions ahead of the prompt
        self.examples = example_images(self.config, examples_dir, n_examples)
        name = path if str(path).endswith('.safetensors') else os.path.join(path, 'ckpt.safetensors')
        self.checkpoint = dict(name=os.path.normpath(name), phase=meta.get('phase'), iter=meta.get('iter_num'),
                               dataset=self.config.get('dataset'))
        self.lock = threading.Lock()  # one request at a time through the model (and PIL's warning filters)
        # a bounded queue: at most max_queue uploads in memory at once, each waiting at most max_wait
        # seconds for the model; any other gets a 503 with Retry-After, never a dropped connection
        self.uploads = threading.BoundedSemaphore(max_queue)
        self.max_queue, self.max_wait = max_queue, max_wait
        self.seconds = 1.0  # the last report's, for the Retry-After of a 503

    def info(self):
        """What the page shows before any image: the checkpoint, the settings, the examples."""
        return dict(checkpoint=self.checkpoint, context=self.context, diagnosis_prompt=self.diagnosis,
                    thresholds=dict(zip(CONDITIONS, self.thresholds)), thresholds_from=self.thresholds_from,
                    conditions=list(CONDITIONS), max_upload_bytes=int(max_upload_mb * 2**20),
                    max_indication=max_indication, generation=self.generation,
                    examples=[dict(index=i, **d) for i, (_, d) in enumerate(self.examples)])

    def report(self, body, indication='', attention=False):
        """The JSON answer for an image's bytes: the report (with a context-trained checkpoint and
        an indication, the report without it too), the 14 probabilities, the conditions present,
        the gate, the seconds taken and, when asked, the attention grid as a base64 PNG."""
        if indication:
            try:
                data.check_context(True, self.config, self.checkpoint['name'])
            except ValueError as e:
                raise RequestError(400, str(e)) from None
        if not self.lock.acquire(timeout=self.max_wait):
            raise self.busy(f"the model was busy for {self.max_wait} s")
        try:
            start = time.perf_counter()
            image = decode_image(body)
            x = self.transform(image)[None].to(self.dev)
            with torch.no_grad(), hardware.autocast(self.dev, self.dtype):
                enc = self.model.encode(x, return_attention=attention)
                probs = enc['cond_logits'][0].float().sigmoid().tolist()
                decisions = decide([probs], self.thresholds)[0].tolist()
                reports = self.reports(enc['visual_tokens'], indication, decisions if self.diagnosis else None)
            p = {c: round(v, 4) for c, v in zip(CONDITIONS, probs)}
            gate = round(enc['gate'][0].item(), 4)
            out = dict(report=reports[0], probabilities=p, thresholds=dict(zip(CONDITIONS, self.thresholds)),
                       thresholds_from=self.thresholds_from, diagnosis_prompt=self.diagnosis,
                       present=[c for c, d in zip(CONDITIONS, decisions) if d], gate=gate,
                       context=self.context, indication=indication or None,
                       image=dict(width=image.width, height=image.height), checkpoint=self.checkpoint)
            if indication:
                out['report_without_indication'] = reports[1]
            if attention:
                png = io.BytesIO()
                maps = enc['attention'][0].float().cpu().numpy()
                attention_grid(image, maps, gate, 'the 20 queries', prior=self.model.cfg.anatomical_prior,
                               atlas=self.model.cfg.atlas).save(png, 'PNG')
                out['attention_png'] = base64.b64encode(png.getvalue()).decode()
            out['seconds'] = round(time.perf_counter() - start, 3)
            self.seconds = out['seconds']
            return out
        finally:
            self.lock.release()

    def busy(self, why):
        """The 503 for an upload that cannot be served in time, with the seconds the queue of
        uploads takes to clear at the last report's pace."""
        wait = max(1, math.ceil(self.seconds * self.max_queue))
        return RequestError(503, f"{why}: too many uploads at once. Try again in {wait} s",
                            {'Retry-After': str(wait)})

    def reports(self, visual_tokens, indication, diagnosis=None):
        """[report] from the visual tokens (1, T, D); [with, without] when there is an indication
        (a context-trained checkpoint only), both in one left-padded batch; with the head's
        decisions ahead of the prompt when there is a diagnosis (a diagnosis_prompt checkpoint)."""
        texts = [indication, ''] if indication else ['']
        return data.write_reports(self.model, self.tok, visual_tokens.expand(len(texts), -1, -1), self.prompt, texts,
                                  [diagnosis] * len(texts), **self.generation)  # the indication is not in them


class Handler(BaseHTTPRequestHandler):
    """One request: the page, the checkpoint's description, an example image or a report.
    Every answer but the page and an example is JSON, errors included."""
    demo = None       # the Demo and the page's bytes, set by make_server
    page = b''
    timeout = 30      # seconds a client may stall mid-request before its connection is dropped
    upload_bytes = 0  # the Content-Length of the request being served, when it is an upload
    server_version = 'CheXQueryDemo'
    default_request_version = 'HTTP/1.0'  # not 0.9, which answers without a status line or headers

    def do_GET(self):
        self.answer(self.get)

    def do_HEAD(self):
        self.answer(self.get)  # send() leaves the body out

    def do_POST(self):
        self.upload_bytes = 0
        self.answer(self.post)
        if self.upload_bytes > RELEASE_AFTER:  # its bytes and its decoded image are freed by now
            hardware.release_freed_memory()

    def answer(self, route):
        try:
            route(urlsplit(self.path))
        except RequestError as e:
            self.close_connection = True  # an unread body must not be taken for the next request
            self.send_json(e.status, dict(error=e.message), e.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left: nobody to answer
        except TimeoutError:
            self.close_connection = True
            self.send_json(408, dict(error=f"the request stalled for over {self.timeout} s"))
        except Exception as e:  # a bug here must not stop the server: say so, keep serving
            traceback.print_exc()
            self.close_connection = True
            self.send_json(500, dict(error=f"internal error ({type(e).__name__}: {e})"))

    def get(self, url):
        match = EXAMPLE.fullmatch(url.path)
        if url.path == '/':
            self.send(200, self.page, 'text/html; charset=utf-8')
        elif url.path == '/api/info':
            self.send_json(200, self.demo.info())
        elif match and int(match[1]) < len(self.demo.examples):
            body, description = self.demo.examples[int(match[1])]
            self.send(200, body, description['type'])
        elif match:
            raise RequestError(404, f"no example {match[1]}: there are {len(self.demo.examples)}, from 0")
        elif url.path == '/api/report':
            raise RequestError(405, "POST the image bytes to /api/report")
        else:
            raise RequestError(404, f"nothing at {url.path[:200]!r}: the page is at /, the API at POST /api/report")

    def post(self, url):
        # the body first: a connection closed on unread bytes is reset, and the client may lose
        # the error it was sent (only a body over the limit is never read). Without a place in
        # the queue it is read and dropped, and the answer is a 503.
        n = self.content_length()
        queued = self.demo.uploads.acquire(blocking=False)
        try:
            body = self.body(n, keep=queued)
            if url.path != '/api/report':
                raise RequestError(404, f"nothing to POST to at {url.path[:200]!r}: the API is POST /api/report")
            indication, attention = self.params(url.query)
            if not queued:
                raise self.demo.busy(f"{self.demo.max_queue} uploads are being served")
            self.send_json(200, self.demo.report(body, indication, attention))
        finally:
            if queued:
                self.demo.uploads.release()

    def params(self, query):
        """(indication, attention) from the query string; anything else is an error."""
        try:
            q = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=8)
        except ValueError as e:
            raise RequestError(400, f"malformed query string {query[:200]!r} ({e})") from None
        for key, values in q.items():
            if key not in ('indication', 'attention'):
                raise RequestError(400, f"unknown query parameter {key[:50]!r} (known: indication, attention)")
            if len(values) > 1:
                raise RequestError(400, f"query parameter {key!r} given {len(values)} times")
        indication = ' '.join(q.get('indication', [''])[0].split())
        if len(indication) > max_indication:
            raise RequestError(400, f"the indication is {len(indication)} characters, over the limit of "
                                    f"{max_indication}")
        attention = q.get('attention', ['0'])[0]
        if attention not in ('0', '1'):
            raise RequestError(400, f"attention must be 0 or 1, got {attention[:20]!r}")
        return indication, attention == '1'

    def content_length(self):
        """The request body's length, checked before a byte of it is read."""
        if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
            raise RequestError(411, "chunked uploads are not supported: send the image with a Content-Length")
        length = self.headers.get('Content-Length')
        if length is None:
            raise RequestError(411, "a Content-Length header is needed: send the image's bytes as the request body")
        if not re.fullmatch(r'[0-9]{1,15}', length.strip()):
            raise RequestError(400, f"Content-Length must be a number of bytes, got {length[:40]!r}")
        n, limit = int(length), int(max_upload_mb * 2**20)
        if n > limit:
            raise RequestError(413, f"the upload is {n:,} bytes ({n / 2**20:.1f} MB), over the limit of "
                                    f"{max_upload_mb} MB")
        self.upload_bytes = n
        return n

    def body(self, n, keep=True):
        """The n bytes of the request body, in memory only, never written to disk; read in pieces
        and dropped (b'') when not kept."""
        parts, got = [], 0
        while got < n:
            part = self.rfile.read(min(n - got, 2**20))
            if not part:
                raise RequestError(400, f"the body ended after {got:,} of the {n:,} bytes its Content-Length "
                                        f"announced")
            got += len(part)
            if keep:
                parts.append(part)
        return b''.join(parts)

    def send(self, status, body, content_type, headers=None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(body)))
        self.send_header('Cache-Control', 'no-store')
        self.send_header('X-Content-Type-Options', 'nosniff')
        self.send_header('Content-Security-Policy', "default-src 'none'; img-src 'self' data: blob:; "
                         "style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; "
                         "frame-ancestors 'none'")  # nothing from elsewhere, nothing framed
        if self.close_connection:
            self.send_header('Connection', 'close')
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def send_json(self, status, obj, headers=None):
        self.send(status, json.dumps(obj).encode(), 'application/json', headers)

    def log_request(self, code='-', size='-'):
        """The access log: the method, the path and the status, never the query string (the
        indication, clinical text, comes in it) or anything of the body."""
        path = urlsplit(self.path).path[:200] if self.command else '-'  # no command: the request line was bad
        self.log_message('"%s %s" %s', self.command or '-', path, getattr(code, 'value', code))

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line or header, an unknown method), as JSON too."""
        self.close_connection = True
        try:
            self.send_json(code, dict(error=message or explain or self.responses.get(code, ('error',))[0]))
        except OSError:
            pass  # the client is gone


def host_warning(host):
    """The warning printed when the demo listens beyond this machine, else None."""
    if host in LOCAL_HOSTS:
        return None
    return (f"warning: listening on {host}: anyone who can reach this address can use the demo; "
            f"there is no authentication")


def make_server(demo, host='127.0.0.1', port=8000):
    """A ThreadingHTTPServer for demo (a Demo), bound (port 0: a free one), ready for serve_forever()."""
    with open(PAGE, 'rb') as f:
        page = f.read()
    handler = type('DemoHandler', (Handler,), dict(demo=demo, page=page))
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    server_class = type('DemoServer', (ThreadingHTTPServer,), dict(address_family=family, daemon_threads=True,
                                                                   request_queue_size=BACKLOG))
    return server_class((host, port), handler)


def main():
    try:
        server = make_server(None, host, port)  # a port already taken fails before the model loads
    except OSError as e:
        sys.exit(f"error: cannot listen on {host}:{port} ({e.strerror or e}): pick another --port, or --port=0")
    dev = hardware.resolve_device(device)
    demo = server.RequestHandlerClass.demo = Demo(ckpt or out_dir, dev, dtype, cpu_kernels,
                                                  {k: globals()[k] for k in GENERATION}, threshold, examples,
                                                  n_examples, max_queue, max_wait)
    if host_warning(host):
        print(host_warning(host), file=sys.stderr)
    name = f'[{host}]' if ':' in host else host
    print(f"CheXQuery demo of {demo.checkpoint['name']} at http://{name}:{server.server_address[1]}/ (Ctrl-C stops it)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == '__main__':
    from configurator import configure
    configure(globals(), sys.argv[1:])
    main()
