// Drives the real OpenComputer TypeScript SDK (@opencomputer/sdk, pinned in
// package.json) against a cellvm cloud, to prove the public API works with it
// unchanged.
//
//   OPENCOMPUTER_API_URL=http://127.0.0.1:PORT OPENCOMPUTER_API_KEY=... \
//     node tests/sdk/compat.mjs
//
// Each check prints one line ("ok - ..." or "FAIL - ...: why"); the last line
// is "N passed, M failed" and the exit code is non-zero if anything failed.
// Only the URL given is contacted.

import { WebSocket as NodeWebSocket } from "ws";
import { Sandbox } from "@opencomputer/sdk";

// The SDK uses the global WebSocket, which Node 20 does not have unflagged.
if (typeof globalThis.WebSocket === "undefined") {
    globalThis.WebSocket = NodeWebSocket;
}

const CHECK_TIMEOUT_MS = 60_000;
const CREATE_TIMEOUT_MS = 180_000;
const WATCHDOG_MS = 15 * 60_000;

let passed = 0;
let failed = 0;

function finish() {
    console.log(`${passed} passed, ${failed} failed`);
    process.exit(failed === 0 ? 0 : 1);
}

const watchdog = setTimeout(() => {
    console.log("FAIL - watchdog: the whole run took longer than 15 minutes");
    failed += 1;
    finish();
}, WATCHDOG_MS);
watchdog.unref();

function withTimeout(promise, ms, what) {
    let timer;
    const limit = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
    });
    return Promise.race([promise, limit]).finally(() => clearTimeout(timer));
}

/** Runs one check; a thrown error or a timeout fails it. Returns success. */
async function check(name, fn, ms = CHECK_TIMEOUT_MS) {
    const t0 = Date.now();
    try {
        await withTimeout(Promise.resolve().then(fn), ms, name);
        passed += 1;
        console.log(`ok - ${name} (${Date.now() - t0} ms)`);
        return true;
    } catch (err) {
        failed += 1;
        const why = String(err?.stack ?? err).split("\n").slice(0, 3).join(" | ");
        console.log(`FAIL - ${name}: ${why}`);
        return false;
    }
}

function expect(cond, what) {
    if (!cond) throw new Error(what);
}

function eq(got, want, what) {
    if (got !== want) {
        throw new Error(`${what}: want ${JSON.stringify(want)}, got ${JSON.stringify(got)}`);
    }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Resolves once pred() holds, polling every 20 ms; rejects after ms. */
async function until(pred, ms, what) {
    const deadline = Date.now() + ms;
    while (!pred()) {
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
        await sleep(20);
    }
}

const text = (chunks) => Buffer.concat(chunks.map((c) => Buffer.from(c))).toString("utf8");

async function main() {
    for (const v of ["OPENCOMPUTER_API_URL", "OPENCOMPUTER_API_KEY"]) {
        if (!process.env[v]) {
            console.log(`FAIL - setup: ${v} is not set`);
            failed += 1;
            return;
        }
    }

    let sb = null;
    const created = await check(
        "Sandbox.create",
        async () => {
            sb = await Sandbox.create({ template: "base", timeout: 0 });
            expect(/^sb-[0-9a-f]+$/.test(sb.sandboxId), `bad sandboxId ${sb.sandboxId}`);
            eq(sb.status, "running", "status");
        },
        CREATE_TIMEOUT_MS,
    );
    if (!created) return;

    try {
        await sandboxChecks(sb);
    } finally {
        await check("sandbox.kill", async () => {
            await sb.kill();
            eq(await sb.isRunning(), false, "isRunning after kill");
            let connectErr = null;
            try {
                await Sandbox.connect(sb.sandboxId);
            } catch (err) {
                connectErr = err;
            }
            expect(connectErr && /404/.test(String(connectErr)), `connect after kill: want a 404 error, got ${connectErr}`);
        });
    }
}

async function sandboxChecks(sb) {
    await check("sandbox.isRunning and Sandbox.connect", async () => {
        eq(await sb.isRunning(), true, "isRunning");
        const again = await Sandbox.connect(sb.sandboxId);
        eq(again.sandboxId, sb.sandboxId, "connect: sandboxId");
        eq(again.status, "running", "connect: status");
    });

    await check("sandbox.setTimeout", async () => {
        await sb.setTimeout(600);
    });

    // --- commands.run (run-async + result polling) ---
    await check("commands.run: stdout, stderr, exit code 0", async () => {
        const r = await sb.commands.run("echo hello; echo oops >&2");
        eq(r.exitCode, 0, "exitCode");
        eq(r.stdout, "hello\n", "stdout");
        eq(r.stderr, "oops\n", "stderr");
    });

    await check("commands.run: failing command", async () => {
        const r = await sb.commands.run("echo partial; exit 3");
        eq(r.exitCode, 3, "exitCode");
        eq(r.stdout, "partial\n", "stdout");
        const missing = await sb.commands.run("no-such-program-xyz");
        eq(missing.exitCode, 127, "exitCode of a missing program");
    });

    await check("commands.run: slow command (polled result)", async () => {
        const r = await sb.commands.run("sleep 1.5; echo late");
        eq(r.exitCode, 0, "exitCode");
        eq(r.stdout, "late\n", "stdout");
    });

    await check("commands.run: env and cwd", async () => {
        const r = await sb.commands.run('echo "$GREETING"; pwd', { env: { GREETING: "hi there" }, cwd: "/tmp" });
        eq(r.exitCode, 0, "exitCode");
        eq(r.stdout, "hi there\n/tmp\n", "stdout");
    });

    // --- exec.start: sessions over WebSocket ---
    await check("exec.start: streamed stdout", async () => {
        const chunks = [];
        const times = [];
        let exitCode = null;
        const s = await sb.exec.start("sh", {
            args: ["-c", "for i in 1 2 3; do echo line$i; sleep 0.4; done"],
            onStdout: (d) => {
                chunks.push(d);
                times.push(Date.now());
            },
            onExit: (c) => {
                exitCode = c;
            },
        });
        expect(typeof s.sessionId === "string" && s.sessionId.length > 0, "no sessionId");
        const code = await s.done;
        const doneAt = Date.now();
        eq(code, 0, "done");
        eq(exitCode, 0, "onExit");
        eq(text(chunks), "line1\nline2\nline3\n", "stdout");
        expect(times.length >= 2 && doneAt - times[0] >= 400, `output was not streamed (chunks at ${times.map((t) => doneAt - t)} ms before exit)`);
        s.close();
    });

    await check("exec.start: stdin, stderr and exit code", async () => {
        const out = [];
        const err = [];
        const s = await sb.exec.start("sh", {
            args: ["-c", "read a; read b; echo got:$a:$b; echo to-stderr >&2; exit 5"],
            onStdout: (d) => out.push(d),
            onStderr: (d) => err.push(d),
        });
        s.sendStdin("first\n");
        s.sendStdin(new TextEncoder().encode("second\n"));
        const code = await s.done;
        eq(code, 5, "exit code");
        eq(text(out), "got:first:second\n", "stdout");
        eq(text(err), "to-stderr\n", "stderr");
        s.close();
    });

    await check("exec.list, exec.kill and exec.attach (replay)", async () => {
        const s = await sb.exec.start("sh", { args: ["-c", "echo started; sleep 300"] });
        const list = await sb.exec.list();
        expect(Array.isArray(list), "list is not an array");
        const mine = list.find((e) => e.sessionID === s.sessionId);
        expect(mine, `session ${s.sessionId} not listed: ${JSON.stringify(list)}`);
        eq(mine.running, true, "running");
        // A second client sees what the session already printed, then 0x04.
        const replay = [];
        let scrollbackEnd = false;
        const other = await sb.exec.attach(s.sessionId, {
            onStdout: (d) => replay.push(d),
            onScrollbackEnd: () => {
                scrollbackEnd = true;
            },
        });
        await until(() => scrollbackEnd && text(replay).includes("started"), 10_000, "replay of 'started' then scrollback end");
        await s.kill(9);
        const code = await withTimeout(s.done, 15_000, "exit after kill");
        expect(code !== 0, `exit code after SIGKILL is ${code}`);
        await withTimeout(other.done, 15_000, "second client sees the exit");
        other.close();
        s.close();
    });

    // --- exec.shell: one bash keeps its state across runs ---
    await check("exec.shell: cwd and env persist across runs", async () => {
        const sh = await sb.exec.shell();
        try {
            let r = await sh.run("mkdir -p /tmp/shell-test && cd /tmp/shell-test");
            eq(r.exitCode, 0, "cd exitCode");
            r = await sh.run("pwd");
            eq(r.stdout, "/tmp/shell-test\n", "pwd after cd");
            r = await sh.run("export KEPT=yes");
            r = await sh.run('echo "kept=$KEPT"; echo warn >&2');
            eq(r.stdout, "kept=yes\n", "exported variable");
            eq(r.stderr, "warn\n", "stderr");
            r = await sh.run("false");
            eq(r.exitCode, 1, "exit code of false");
        } finally {
            await withTimeout(sh.close(), 10_000, "shell close");
        }
    });

    // --- files ---
    await check("files.write and files.read (text, parents created)", async () => {
        await sb.files.write("/root/sdk-test/hello.txt", "hello files\n");
        eq(await sb.files.read("/root/sdk-test/hello.txt"), "hello files\n", "read back");
        const r = await sb.commands.run("cat /root/sdk-test/hello.txt");
        eq(r.stdout, "hello files\n", "seen by a command");
    });

    await check("files.write and files.readBytes (binary)", async () => {
        const bytes = new Uint8Array(70_000);
        for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7 + 3) & 0xff;
        await sb.files.write("/root/sdk-test/blob.bin", bytes);
        const back = await sb.files.readBytes("/root/sdk-test/blob.bin");
        eq(back.length, bytes.length, "length");
        expect(Buffer.from(back).equals(Buffer.from(bytes)), "content differs");
    });

    await check("files.makeDir and files.list", async () => {
        await sb.files.makeDir("/root/sdk-test/a/b");
        await sb.files.makeDir("/root/sdk-test/a/b"); // like mkdir -p: again is fine
        const entries = await sb.files.list("/root/sdk-test");
        expect(Array.isArray(entries), "list is not an array");
        const by = Object.fromEntries(entries.map((e) => [e.name, e]));
        expect(by["hello.txt"], `hello.txt not listed: ${JSON.stringify(entries)}`);
        eq(by["hello.txt"].isDir, false, "hello.txt isDir");
        eq(by["hello.txt"].size, 12, "hello.txt size");
        eq(by["hello.txt"].path, "/root/sdk-test/hello.txt", "hello.txt path");
        expect(by.a, `a not listed: ${JSON.stringify(entries)}`);
        eq(by.a.isDir, true, "a isDir");
        const inner = await sb.files.list("/root/sdk-test/a");
        eq(inner.map((e) => e.name).join(","), "b", "entries of a");
    });

    await check("files.exists and files.remove", async () => {
        eq(await sb.files.exists("/root/sdk-test/hello.txt"), true, "exists before remove");
        eq(await sb.files.exists("/root/sdk-test/nope.txt"), false, "exists of a missing file");
        await sb.files.remove("/root/sdk-test/hello.txt");
        eq(await sb.files.exists("/root/sdk-test/hello.txt"), false, "exists after remove");
        await sb.files.remove("/root/sdk-test/a");
        const names = (await sb.files.list("/root/sdk-test")).map((e) => e.name).sort();
        eq(names.join(","), "blob.bin", "left after removing a file and a tree");
        let readErr = null;
        try {
            await sb.files.read("/root/sdk-test/hello.txt");
        } catch (err) {
            readErr = err;
        }
        expect(readErr && /404/.test(String(readErr)), `read of a removed file: want a 404 error, got ${readErr}`);
    });

    // --- pty ---
    await check("pty.create: run a command, see its output", async () => {
        const out = [];
        const pty = await sb.pty.create({ cols: 100, rows: 30, onOutput: (d) => out.push(d) });
        expect(typeof pty.sessionId === "string" && pty.sessionId.length > 0, "no sessionId");
        try {
            // The SDK returns before its WebSocket is open and send() throws
            // until then, so retry the first send briefly.
            const line = "echo pty-$((6*7)); tty\n";
            const deadline = Date.now() + 15_000;
            for (;;) {
                try {
                    pty.send(line);
                    break;
                } catch (err) {
                    if (Date.now() > deadline) throw err;
                    await sleep(50);
                }
            }
            await until(() => text(out).includes("pty-42"), 20_000, `"pty-42" in the terminal (got ${JSON.stringify(text(out))})`);
            await until(() => /\/dev\/pts\/\d+/.test(text(out)), 10_000, `a /dev/pts name from tty (got ${JSON.stringify(text(out))})`);
        } finally {
            pty.close();
        }
    });
}

main()
    .catch((err) => {
        failed += 1;
        console.log(`FAIL - unexpected: ${String(err?.stack ?? err).split("\n").slice(0, 3).join(" | ")}`);
    })
    .finally(finish);
