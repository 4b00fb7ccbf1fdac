// A line-at-a-time driver of headless Chromium for the Rust tests: each line on stdin is a
// JSON command, each answer one JSON line on stdout ({"ok":true,"value":...} or
// {"ok":false,"error":"..."}). Commands: open {url}, fill {sel,text}, click {sel},
// text {sel}, wait {js, timeout_ms} (until the expression is truthy), eval {js},
// screenshot {path}, dialogs {accept} (how confirm() boxes are answered), quit.
import { chromium } from "playwright-core";
import readline from "node:readline";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
let accept = true;
const dialogs = [];
page.on("dialog", (d) => { dialogs.push(d.message()); accept ? d.accept() : d.dismiss(); });
const failed = [];
page.on("response", (r) => { if (r.status() >= 400) failed.push(r.status() + " " + new URL(r.url()).pathname); });

async function run(c) {
  switch (c.op) {
    case "open": await page.goto(c.url, { waitUntil: "load" }); return null;
    case "fill": await page.fill(c.sel, c.text); return null;
    case "click": await page.click(c.sel); return null;
    case "text": return await page.textContent(c.sel);
    case "eval": return await page.evaluate(c.js);
    case "wait": {
      // Polled with evaluate (the page's CSP forbids the eval that waitForFunction uses).
      const end = Date.now() + (c.timeout_ms || 20000);
      for (;;) {
        const v = await page.evaluate(c.js);
        if (v) return v;
        if (Date.now() > end) throw new Error("timed out waiting for " + c.js + " (last value " + JSON.stringify(v) + ")");
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    case "screenshot": await page.screenshot({ path: c.path, fullPage: true }); return c.path;
    case "dialogs": accept = !!c.accept; return dialogs.splice(0);
    case "failed": return failed.splice(0);
    case "quit": await browser.close(); process.exit(0);
    default: throw new Error("unknown op " + c.op);
  }
}

const rl = readline.createInterface({ input: process.stdin });
for await (const line of rl) {
  let out;
  try { out = { ok: true, value: await run(JSON.parse(line)) }; } catch (e) { out = { ok: false, error: String(e.message || e) }; }
  process.stdout.write(JSON.stringify(out ?? null) + "\n");
}
await browser.close();
