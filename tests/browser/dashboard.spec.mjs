// Drives the coordinator's dashboard in headless Chromium: log in, submit a task through
// the form, watch its state change on the list without a reload, open it and watch the
// agent's output stream in, rendered by kind and escaped; cancel a second task with the
// page's button; check the session cookie, the CSRF defence and logout. Started by
// tests/tests/dashboard_browser.rs, which runs a coordinator and a worker and passes:
//   AO_DASHBOARD_URL    the coordinator's base URL
//   AO_DASHBOARD_TOKEN  the API token (environment only, never argv)
//   AO_REPOSITORY       a repository the worker can push to
//   AO_ARTIFACTS        where to save screenshots
//   AO_AGENT_GATE       a file the agent waits for half-way through its run
// Exits non-zero with a message on the first failed check.
import { chromium } from 'playwright-core';
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const BASE = need('AO_DASHBOARD_URL').replace(/\/+$/, '');
const TOKEN = need('AO_DASHBOARD_TOKEN');
const REPOSITORY = need('AO_REPOSITORY');
const ARTIFACTS = need('AO_ARTIFACTS');
const GATE = need('AO_AGENT_GATE');
const CHROMIUM = process.env.AO_CHROMIUM || '/usr/bin/chromium';
// Generous: a loaded two-core machine runs the whole cluster besides the browser.
const WAIT = 60_000;
const HOSTILE_PROMPT = 'Add a note <img src=x onerror="window.__pwned=1"> & <b>bold</b>';

function need(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`${name} is not set (tests/tests/dashboard_browser.rs sets it)`);
    process.exit(2);
  }
  return v;
}

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

function step(message) {
  console.log(`· ${message}`);
}

const userDataDir = mkdtempSync(join(tmpdir(), 'ao-chromium-'));
mkdirSync(ARTIFACTS, { recursive: true });
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: CHROMIUM,
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
  viewport: { width: 1280, height: 900 },
});
const problems = [];
let page;
try {
  page = context.pages()[0] || (await context.newPage());
  // The wrong login, the forged request and the call after logout fail on purpose (401,
  // 403); any other error, a CSP violation above all, is a problem.
  page.on('console', (m) => {
    if (m.type() === 'error' && !/Failed to load resource: .*status of 40[13]/.test(m.text())) {
      problems.push(`console: ${m.text()} (${m.location().url || ''})`);
    }
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));

  step('a visitor without a session is sent to the login page');
  await page.goto(`${BASE}/`);
  check(new URL(page.url()).pathname === '/login', `at ${page.url()}`);
  const loginResponse = await page.request.get(`${BASE}/login`);
  const csp = loginResponse.headers()['content-security-policy'] || '';
  check(csp.includes("script-src 'self'") && !csp.includes('unsafe-inline'), `CSP: ${csp}`);

  step('a wrong token is refused');
  await page.fill('#token', 'not-the-token');
  await Promise.all([page.waitForLoadState('load'), page.click('button[type=submit]')]);
  check((await page.textContent('#login-error')).includes('not the API token'), 'error shown');

  step('the right token starts a session');
  await page.fill('#token', TOKEN);
  await Promise.all([page.waitForURL(`${BASE}/`), page.click('button[type=submit]')]);
  await page.waitForSelector('#live.live-live', { timeout: WAIT });
  const cookies = await context.cookies(BASE);
  const session = cookies.find((c) => c.name === 'ao_session');
  check(session && session.httpOnly && session.sameSite === 'Strict' && session.path === '/', `session cookie ${JSON.stringify(session)}`);
  check(session.value !== TOKEN && !session.value.includes(TOKEN), 'the cookie is not the token');
  check(!(await page.evaluate(() => document.cookie)).includes('ao_session'), 'the session cookie is not readable by scripts');
  check(!(await page.content()).includes(TOKEN), 'the token is not in the page');

  step('a task submitted with the form appears and changes state without a reload');
  await page.evaluate(() => { window.__noReload = 'still here'; });
  await page.click('#new-task-box > summary');
  await page.fill('#nt-repository', REPOSITORY);
  await page.fill('#nt-prompt', HOSTILE_PROMPT);
  await page.fill('#nt-pipeline', 'code');
  await page.click('#new-task button[type=submit]');
  const row = page.locator('#tasks tr', { hasText: 'Add a note' }).first();
  await row.waitFor({ timeout: WAIT });
  const taskId = await row.getAttribute('data-id');
  const seen = new Set([await row.getAttribute('data-status')]);
  // Follow the row until it is running; the agent takes several seconds, so it is seen.
  await page.waitForFunction((id) => {
    const tr = document.querySelector(`#tasks tr[data-id="${id}"]`);
    return tr && tr.dataset.status === 'running';
  }, taskId, { timeout: WAIT, polling: 100 });
  seen.add('running');
  check(await page.evaluate(() => window.__noReload) === 'still here', 'the list was not reloaded');
  check(await row.locator('td.title a').textContent() === HOSTILE_PROMPT.slice(0, 80), 'the title is shown as text');
  check(await page.locator('#tasks img, #tasks b').count() === 0, 'no markup from the prompt');

  step('the task page streams the agent output as it comes');
  await row.locator('td.title a').click();
  await page.waitForURL(`${BASE}/tasks/${taskId}`);
  // The agent has said its first words and waits for the gate: what follows can only
  // arrive through the open stream.
  await page.locator('#events .ev-text', { hasText: 'Looking at the repository' }).waitFor({ timeout: WAIT });
  check(await page.locator('#events .ev-result').count() === 0, 'the run is not over yet');
  check(await page.locator('#events .ev-tool_use', { hasText: 'Write' }).count() === 0, 'later output not there yet');
  await page.evaluate(() => { window.__noReload = 'task page'; });
  writeFileSync(GATE, 'open\n');
  await page.locator('#events .ev-tool_use', { hasText: 'Write' }).waitFor({ timeout: WAIT });
  await page.waitForFunction(() => document.querySelector('#t-status')?.textContent === 'succeeded', null, { timeout: WAIT });
  check(await page.evaluate(() => window.__noReload) === 'task page', 'the task page was not reloaded');
  await page.waitForSelector('#events .ev-result', { timeout: WAIT });
  await page.waitForFunction(() => [...document.querySelectorAll('#events .ev-state')].some((e) => e.textContent.includes('succeeded')),
    null, { timeout: WAIT });

  step('events are rendered by kind, readable, and escaped');
  const text = await page.locator('#events .ev-text').allTextContents();
  check(text.some((t) => t.includes('Looking at the repository')), `assistant text: ${text}`);
  check(text.some((t) => t.includes('<script>window.__pwned=2</script>')), 'hostile text shown literally');
  const tool = await page.locator('#events .ev-tool_use').first().textContent();
  check(tool.includes('Bash') && tool.includes('ls -la'), `tool use: ${tool}`);
  const write = await page.locator('#events .ev-tool_use', { hasText: 'Write' }).first().textContent();
  check(write.includes('NOTES.md') && !write.includes('secret body'), `Write shows its file_path only: ${write}`);
  const result = page.locator('#events .ev-tool_result details').first();
  check(!(await result.evaluate((d) => d.open)), 'tool results start collapsed');
  check((await result.locator('summary').textContent()).includes('README.md'), 'tool result first line');
  const log = await page.locator('#events .ev-log').allTextContents();
  check(log.some((l) => l.includes('a plain line')), `plain output as log: ${log}`);
  const done = await page.locator('#events .ev-result').textContent();
  check(done.includes('$0.0420') || done.includes('$0.04'), `result with cost: ${done}`);
  check(await page.locator('#events script, #events img, #events b').count() === 0, 'no markup from agent output');
  check(await page.evaluate(() => window.__pwned) === undefined, 'no injected script ran');
  const sub = page.locator('#subtasks tr').first();
  check((await sub.getAttribute('data-status')) === 'succeeded', 'subtask succeeded');
  check((await sub.textContent()).includes('coder'), 'subtask capability shown');
  check((await page.locator('#t-facts').textContent()).includes('$0.04'), 'task cost shown');

  step('the plan is drawn as a graph, and the diff of the step is rendered, escaped');
  const rowsShown = await page.locator('#subtasks tr').count();
  await page.waitForSelector('#plan svg g.node', { timeout: WAIT });
  check(await page.locator('#plan svg g.node').count() === rowsShown, 'one graph node per subtask');
  check((await page.locator('#plan svg g.node').first().getAttribute('data-status')) === 'succeeded', 'node state');
  await page.waitForSelector('#diffs details.diff .d2h-file-wrapper', { timeout: WAIT });
  const whole = await page.locator('#diffs details.diff-branch').textContent();
  check(whole.includes('against its base') && whole.includes('NOTES.md'), `the branch against its base: ${whole.slice(0, 200)}`);
  const diff = await page.locator('#diffs details.diff[data-subtask]:not(.diff-branch)').first().textContent();
  check(diff.includes('NOTES.md') && diff.includes('+1 −0'), `diff summary and file: ${diff.slice(0, 200)}`);
  check(diff.includes('<script>window.__pwned=4</script>'), 'the diff shows hostile lines as text');
  check(await page.locator('#diffs script, #diffs img').count() === 0, 'no markup from the diff');
  check(await page.evaluate(() => window.__pwned) === undefined, 'no script of the diff ran');
  check(await page.locator('#events .ev-diff', { hasText: 'NOTES.md' }).count() === 1, 'the diff event in the activity');
  const dag = await page.evaluate(() => {
    const plan = (id, deps, branch) => ({ id, capability: 'coder', status: 'pending', step: { kind: 'plan', id, title: id, depends_on: deps, branch } });
    const subs = [
      { id: 'p', capability: 'planner', status: 'succeeded' },
      plan('a', [], 'b-a'), plan('b', [], 'b-b'),
      { id: 'm', capability: 'coder', status: 'pending', step: { kind: 'integrate', branches: ['b-a', 'b-b'] } },
      plan('t', ['a', 'b']),
    ];
    const svgNode = planGraph(subs);
    return { edges: planEdges(subs), nodes: svgNode.querySelectorAll('g.node').length, paths: svgNode.querySelectorAll('path.edge').length };
  });
  check(JSON.stringify(dag.edges) === JSON.stringify([[], [0], [0], [1, 2], [1, 2]]), `plan edges: ${JSON.stringify(dag.edges)}`);
  check(dag.nodes === 5 && dag.paths === 6, `graph of a plan: ${JSON.stringify(dag)}`);
  const swarm = await page.evaluate(() => {
    const tryOf = (k) => ({ id: `a${k}`, capability: 'coder', status: 'succeeded', step: { kind: 'plan', id: 'a', title: 'a', branch: `s-a-try${k}`, candidate: k } });
    const subs = [
      { id: 'p', capability: 'planner', status: 'succeeded' },
      tryOf(1), tryOf(2),
      { id: 'k', capability: 'reviewer', status: 'pending', step: { kind: 'pick', id: 'a', title: 'a', candidates: ['s-a-try1', 's-a-try2'], branch: 's-a' } },
      { id: 'm', capability: 'coder', status: 'pending', step: { kind: 'integrate', branches: ['s-a'] } },
    ];
    return planEdges(subs);
  });
  check(JSON.stringify(swarm) === JSON.stringify([[], [0], [0], [1, 2], [3]]), `swarm edges: ${JSON.stringify(swarm)}`);
  // On a page of its own: Chromium reports the handlers of the hostile HTML below to the
  // CSP as the inert document's parser meets them (none runs: checked after), which the
  // main page would count as problems.
  const probe = await context.newPage();
  await probe.goto(page.url());
  await probe.waitForFunction(() => typeof inertNodes === 'function', null, { timeout: WAIT });
  const kept = await probe.evaluate(() => {
    const nodes = inertNodes('<div class="d2h-file" onclick="window.__pwned=5"><img src=x onerror="window.__pwned=6">text<script>window.__pwned=7</script><a href="javascript:alert(1)">l</a><a href="#f">f</a></div>');
    const box = document.createElement('div');
    box.append(...nodes);
    return { html: box.innerHTML, text: box.textContent };
  });
  check(!/onclick|onerror|<img|<script|javascript:/.test(kept.html) && kept.html.includes('href="#f"') && kept.text.includes('text'),
    `diff HTML kept to its allow-list: ${kept.html}`);
  check(await probe.evaluate(() => window.__pwned) === undefined, 'nothing of the filtered HTML ran');
  await probe.close();
  await page.screenshot({ path: join(ARTIFACTS, 'dashboard-task.png'), fullPage: true });

  step('GitHub tasks link their issue and pull request; unknown events show as one line of JSON');
  const links = await page.evaluate(() => [
    githubLinks({ source: { kind: 'github', installation_id: 1, repo: 'octo/widgets', issue: 7, pull_request: 9 } }),
    githubLinks({ source: { kind: 'github', installation_id: 1, repo: 'javascript:alert(1)//x', issue: 7 } }),
    githubLinks({ source: { kind: 'api' } }),
  ]);
  check(links[0].issue.href === 'https://github.com/octo/widgets/issues/7' && links[0].issue.label === 'octo/widgets#7', JSON.stringify(links[0]));
  check(links[0].pr.href === 'https://github.com/octo/widgets/pull/9', JSON.stringify(links[0]));
  check(!links[1].issue && !links[2].issue, `no link from a strange repo name: ${JSON.stringify(links)}`);
  const unknown = await page.evaluate(() => {
    const e = renderEvent({ seq: 1, kind: 'agent', at: new Date().toISOString(), data: { type: 'mystery', event: { a: '<b>x</b>' } } }, new Map());
    return { cls: e.className, text: e.textContent, markup: e.querySelectorAll('b').length };
  });
  check(unknown.cls.includes('ev-unknown') && unknown.text.includes('{"type":"mystery","a":"<b>x</b>"}') && unknown.markup === 0,
    `unknown event: ${JSON.stringify(unknown)}`);

  step('refused network destinations show as such, their host as text');
  const refusals = await page.evaluate(() => {
    const at = new Date().toISOString();
    const one = renderEvent({ seq: 2, kind: 'agent', at, data: { type: 'network_denied', event: { host: '<b>evil</b>.example', port: 443, method: 'CONNECT', at } } }, new Map());
    const all = renderEvent({ seq: 3, kind: 'agent', at, data: { type: 'network_refused', event: { total: 4, unlisted: 0, refused: [
      { host: 'evil.example', port: 443, count: 3, first_at: at, last_at: at }, { host: '169.254.169.254', port: 80, count: 1, first_at: at, last_at: at }] } } }, new Map());
    return [one, all].map((e) => ({ cls: e.className, text: e.textContent, markup: e.querySelectorAll('b').length }));
  });
  check(refusals[0].cls.includes('ev-network_denied') && refusals[0].text.includes('network refused: CONNECT <b>evil</b>.example:443') && refusals[0].markup === 0,
    `a refused destination: ${JSON.stringify(refusals[0])}`);
  check(refusals[1].cls.includes('ev-network_refused') && refusals[1].text.includes('network refused 4 requests to 2 destinations: evil.example:443 (3×), 169.254.169.254:80 (1×)'),
    `the run's refused destinations: ${JSON.stringify(refusals[1])}`);

  step('the cancel button stops a running task (a cookie-authenticated change with the CSRF header)');
  await page.goto(`${BASE}/`);
  await page.waitForSelector('#live.live-live', { timeout: WAIT });
  await page.click('#new-task-box > summary');
  await page.fill('#nt-repository', REPOSITORY);
  await page.fill('#nt-prompt', 'slow task to cancel');
  await page.fill('#nt-pipeline', 'code');
  await page.click('#new-task button[type=submit]');
  const slow = page.locator('#tasks tr', { hasText: 'slow task to cancel' }).first();
  await slow.waitFor({ timeout: WAIT });
  const slowId = await slow.getAttribute('data-id');
  await page.waitForFunction((id) => document.querySelector(`#tasks tr[data-id="${id}"]`)?.dataset.status === 'running',
    slowId, { timeout: WAIT, polling: 100 });
  await page.screenshot({ path: join(ARTIFACTS, 'dashboard-list.png'), fullPage: true });

  const forged = await page.evaluate(async (id) => (await fetch(`/api/v1/tasks/${id}/cancel`, { method: 'POST' })).status, slowId);
  check(forged === 403, `a change without the CSRF header is refused (got ${forged})`);

  await slow.locator('td.title a').click();
  await page.waitForURL(`${BASE}/tasks/${slowId}`);
  await page.waitForSelector('#act-cancel:not([hidden])', { timeout: WAIT });
  await page.click('#act-cancel');
  await page.waitForFunction(() => document.querySelector('#t-status')?.textContent === 'cancelled', null, { timeout: WAIT });
  await page.waitForSelector('#act-retry:not([hidden])', { timeout: WAIT });
  check(await page.locator('#act-cancel').isHidden(), 'no cancel button on a cancelled task');

  step('logout ends the session');
  await Promise.all([page.waitForURL(`${BASE}/login`), page.click('#logout')]);
  const after = await page.evaluate(async () => (await fetch('/api/v1/tasks')).status);
  check(after === 401, `API after logout: ${after}`);
  check(!(await context.cookies(BASE)).some((c) => c.name === 'ao_session'), 'session cookie cleared');

  check(problems.length === 0, `no console errors or CSP violations:\n${problems.join('\n')}`);
  console.log(`dashboard ok: task ${taskId} went ${[...seen].join(' → ')} → succeeded; task ${slowId} cancelled`);
} catch (e) {
  console.error(e.stack || String(e));
  if (problems.length) console.error(`console:\n${problems.join('\n')}`);
  if (page) {
    try { await page.screenshot({ path: join(ARTIFACTS, 'dashboard-failure.png'), fullPage: true }); } catch (_) { /* none */ }
  }
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
