import { WebSocket as W } from "ws"; globalThis.WebSocket = W;
import { Sandbox } from "@opencomputer/sdk";
const sb = await Sandbox.create({});
const s = await sb.exec.start("sh", { args: ["-c", "echo started; sleep 300"] });
await new Promise(r => setTimeout(r, 500));
let got = 0, n = 40;
for (let i = 0; i < n; i++) {
  let end = false;
  const o = await sb.exec.attach(s.sessionId, { onScrollbackEnd: () => { end = true; } });
  await new Promise(r => setTimeout(r, 300));
  if (end) got++;
  o.close();
}
console.log(`scrollback end seen ${got}/${n}`);
await s.kill(9);
await sb.kill(); process.exit(0);
