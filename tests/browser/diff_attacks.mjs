// Hostile diffs against the task page's diff view, in headless Chromium without a
// coordinator: the dashboard's own script (app.js) and the vendored diff2html are loaded
// into a blank page, and `diffView` renders `diff` events made by a hostile repository
// (file names with markup, quotes and newlines, renames, binary files, a huge line, many
// files). Started by tests/tests/n_breaker2.rs, which passes:
//   AO_ASSETS   the dashboard's assets directory
// Prints one JSON line per attack ({name, ok, detail}) and exits non-zero if any broke.
import { chromium } from 'playwright-core';
import { join } from 'node:path';

const ASSETS = process.env.AO_ASSETS;
const CHROMIUM = process.env.AO_CHROMIUM || '/usr/bin/chromium';
if (!ASSETS) { console.error('AO_ASSETS is not set'); process.exit(2); }

const file = (name, lines) => `diff --git a/${name} b/${name}\nnew file mode 100644\nindex 0000000..e69de29\n--- /dev/null\n+++ b/${name}\n@@ -0,0 +1,${lines.length} @@\n${lines.map((l) => `+${l}`).join('\n')}\n`;
const MARKUP = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>';

const attacks = {
  markup_file_name: file(`x${MARKUP}.md`, ['a']),
  quoted_attr_file_name: file('x" onmouseover="window.__pwned=3" id="events', ['a']),
  id_file_name: file('"><div id="act-approve" class="primary">Approve</div>', ['a']),
  newline_file_name: `diff --git "a/x\\n<script>window.__pwned=4</script>" "b/x\\n<script>window.__pwned=4</script>"\nnew file mode 100644\nindex 0000000..e69de29\n--- /dev/null\n+++ "b/x\\n<script>window.__pwned=4</script>"\n@@ -0,0 +1 @@\n+a\n`,
  rename_markup: `diff --git a/old${MARKUP} b/new${MARKUP}\nsimilarity index 100%\nrename from old${MARKUP}\nrename to new${MARKUP}\n`,
  binary_markup: `diff --git a/bin${MARKUP} b/bin${MARKUP}\nnew file mode 100644\nindex 0000000..1234567\nBinary files /dev/null and b/bin${MARKUP} differ\n`,
  huge_line: file('big.txt', [`${'<b>x</b>'.repeat(20000)}${MARKUP}`]),
  many_files: Array.from({ length: 2000 }, (_, i) => file(`f${i}<i>.txt`, [`${MARKUP}`])).join(''),
  // The runner cuts the patch at a file boundary to fit the event bound: a large decoy
  // file first, and the change that matters is only in the event's file list.
  hidden_past_the_cut: {
    files: [{ path: 'aaa-decoy.txt', added: 3000, deleted: 0 }, { path: 'zzz-backdoor.sh', added: 1, deleted: 0 }],
    files_total: 2, truncated: true, patch_bytes: 60000,
    patch: file('aaa-decoy.txt', Array.from({ length: 3000 }, () => 'noise')),
    must_show: 'zzz-backdoor.sh',
  },
  hunk_header_markup: `diff --git a/h b/h\nindex 1..2 100644\n--- a/h\n+++ b/h\n@@ -1 +1 @@ ${MARKUP}\n-a\n+b\n`,
};

const PAGE_IDS = ['events', 'diffs', 'diffs-none', 'follow', 'act-cancel', 'act-retry', 'act-approve', 'act-error',
  't-status', 't-title', 't-prompt', 't-facts', 't-error', 't-duration', 'plan', 'subtasks'];

// AO_ATTACKS: a comma-separated list of the attacks to run (all when unset).
const only = (process.env.AO_ATTACKS || '').split(',').filter(Boolean);
const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
let broke = 0;
try {
  const page = await browser.newPage();
  await page.setContent('<!doctype html><html><body><div id="diffs"></div></body></html>');
  await page.addScriptTag({ path: join(ASSETS, 'vendor', 'diff2html.min.js') });
  await page.addScriptTag({ path: join(ASSETS, 'app.js') });
  for (const [name, attack] of Object.entries(attacks)) {
    if (only.length && !only.includes(name)) continue;
    const event = typeof attack === 'string' ? { files: [{ path: 'x', added: 1, deleted: 0 }], patch: attack } : attack;
    const result = await page.evaluate(([event, pageIds]) => {
      const started = performance.now();
      const view = diffView({ id: 's1', capability: 'coder', step: { kind: 'plan', id: 'a' } }, event);
      const box = document.getElementById('diffs');
      box.replaceChildren(view);
      const ms = Math.round(performance.now() - started);
      const problems = [];
      for (const node of view.querySelectorAll('*')) {
        if (['script', 'img', 'iframe', 'object', 'embed', 'style', 'link', 'form', 'input', 'button'].includes(node.localName)) problems.push(`element ${node.localName}`);
        for (const a of node.attributes) {
          if (/^on/i.test(a.name)) problems.push(`handler ${a.name}`);
          if (a.name === 'href' && !a.value.startsWith('#')) problems.push(`href ${a.value}`);
          if (a.name === 'id' && (pageIds.includes(a.value) || !/^d2h--?[0-9]+$/.test(a.value))) problems.push(`id ${a.value.slice(0, 80)}`);
          if (a.name === 'class' && /(^|\s)(primary|st-|ev-)/.test(a.value)) problems.push(`class ${a.value.slice(0, 80)}`);
        }
      }
      if (event.must_show && !view.textContent.includes(event.must_show)) problems.push(`${event.must_show} is shown nowhere`);
      return { problems: problems.slice(0, 5), ms, text: view.textContent.length, pwned: window.__pwned };
    }, [event, PAGE_IDS]);
    const ok = result.problems.length === 0 && result.pwned === undefined && result.text > 0;
    if (!ok) broke += 1;
    console.log(JSON.stringify({ name, ok, detail: result }));
  }
} finally {
  await browser.close();
}
process.exit(broke ? 1 : 0);
