// In-sandbox worker for Node.js functions: load the handler once, then serve invocations one at a time.
// Same frame protocol as python_worker.py: <II (header length, body length), JSON header, body; requests
// on fd REQ, answers on fd RESP, logs on fd 1/2 followed by the request's end marker on fd 1.
// Between invocations the worker blocks in readSync: like Lambda, the environment is frozen then.
"use strict";
const fs = require("fs");
const path = require("path");
const { pathToFileURL } = require("url");

const [reqFd, respFd, handlerName, payloadLimit, functionName, functionVersion, memoryMb] = process.argv.slice(2);
const TASK_ROOT = "/var/task";

function readExact(fd, n) {
  const buf = Buffer.alloc(n);
  let got = 0;
  while (got < n) {
    const r = fs.readSync(fd, buf, got, n - got, null);
    if (r === 0) throw new Error("EOF");
    got += r;
  }
  return buf;
}

function readFrame(fd) {
  const head = readExact(fd, 8);
  const headerLen = head.readUInt32LE(0);
  const bodyLen = head.readUInt32LE(4);
  const header = JSON.parse(readExact(fd, headerLen).toString("utf8"));
  return [header, bodyLen ? readExact(fd, bodyLen) : Buffer.alloc(0)];
}

function writeAll(fd, buf) {
  let off = 0;
  while (off < buf.length) off += fs.writeSync(fd, buf, off, buf.length - off);
}

function writeFrame(fd, header, body) {
  const head = Buffer.from(JSON.stringify(header), "utf8");
  const sizes = Buffer.alloc(8);
  sizes.writeUInt32LE(head.length, 0);
  sizes.writeUInt32LE(body ? body.length : 0, 4);
  writeAll(fd, Buffer.concat([sizes, head, body || Buffer.alloc(0)]));
}

function errorBody(err) {
  const e = err instanceof Error ? err : new Error(String(err));
  return { errorType: e.name || "Error", errorMessage: e.message, stackTrace: String(e.stack || "").split("\n").slice(1) };
}

async function load() {
  const dot = handlerName.lastIndexOf(".");
  if (dot <= 0) throw new Error(`bad handler ${handlerName}: expected file.export`);
  const file = handlerName.slice(0, dot);
  const exportName = handlerName.slice(dot + 1);
  let found = null;
  for (const ext of [".js", ".mjs", ".cjs"]) {
    const candidate = path.join(TASK_ROOT, file + ext);
    if (fs.existsSync(candidate)) { found = candidate; break; }
  }
  if (found === null) throw new Error(`cannot find module ${file} in the package`);
  const mod = await import(pathToFileURL(found).href);
  const fn = mod[exportName] ?? (mod.default && mod.default[exportName]);
  if (typeof fn !== "function") throw new Error(`handler ${exportName} missing on module ${file}`);
  return fn;
}

function closeInheritedFds() {
  // bwrap passes on the descriptors it was given for its own use (code and bootstrap directories).
  const keep = new Set([0, 1, 2, Number(reqFd), Number(respFd)]);
  let entries = [];
  try { entries = fs.readdirSync("/proc/self/fd"); } catch (err) { return; }
  for (const name of entries) {
    const fd = Number(name);
    if (keep.has(fd)) continue;
    try {
      if (fs.fstatSync(fd).isDirectory()) fs.closeSync(fd);
    } catch (err) { /* already closed, or node's own */ }
  }
}

async function main() {
  closeInheritedFds();
  let handler;
  try {
    handler = await load();
  } catch (err) {
    console.error(err && err.stack ? err.stack : String(err));
    writeFrame(Number(respFd), { ready: false, error: errorBody(err) });
    return;
  }
  writeFrame(Number(respFd), { ready: true });
  for (;;) {
    let header, eventBytes;
    try {
      [header, eventBytes] = readFrame(Number(reqFd));
    } catch (err) {
      return;
    }
    const started = process.hrtime.bigint();
    const deadline = header.deadline_ms;
    const context = {
      awsRequestId: header.request_id, requestId: header.request_id, functionName, functionVersion,
      memoryLimitInMB: Number(memoryMb), getRemainingTimeInMillis: () => Math.max(0, Math.floor(deadline - Date.now())),
    };
    let answer = { outcome: "ok" };
    let body;
    try {
      const event = eventBytes.length ? JSON.parse(eventBytes.toString("utf8")) : null;
      // Handlers of the (event, context, callback) form answer through the callback.
      const result = handler.length >= 3
        ? await new Promise((resolve, reject) => {
            const returned = handler(event, context, (err, value) => (err ? reject(err) : resolve(value)));
            if (returned && typeof returned.then === "function") returned.then(resolve, reject);
          })
        : await handler(event, context);
      body = Buffer.from(result === undefined ? "null" : JSON.stringify(result), "utf8");
      if (body.length > Number(payloadLimit)) {
        const e = new Error(`response payload of ${body.length} bytes exceeds the limit of ${payloadLimit}`);
        e.name = "ResponseTooLarge";
        throw e;
      }
    } catch (err) {
      console.error(err && err.stack ? err.stack : String(err));
      answer = { outcome: "error" };
      body = Buffer.from(JSON.stringify(errorBody(err)), "utf8");
    }
    answer.duration_ms = Number(process.hrtime.bigint() - started) / 1e6;
    writeAll(1, Buffer.from(header.marker, "utf8"));
    writeFrame(Number(respFd), answer, body);
  }
}

main().then(() => process.exit(0), (err) => { console.error(err); process.exit(1); });
