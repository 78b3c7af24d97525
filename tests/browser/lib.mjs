// Helpers of the browser checks: the fixture, checks and results, the API client, and
// contexts that record and abort every request leaving localhost.

const fx = JSON.parse(process.env.RESERVOIR_BROWSER_FIXTURE ?? '{}');
const results = [];
const external = [];

async function check(name, fn) {
  const started = Date.now();
  try {
    await fn();
    results.push({ name, ok: true });
    console.log(`ok     ${name} (${Date.now() - started} ms)`);
  } catch (e) {
    results.push({ name, ok: false });
    console.log(`FAILED ${name}: ${e?.stack ?? e}`);
  }
}

function assert(condition, message) {
  if (!condition) throw new Error(message);
}

async function api(token, query, variables = {}) {
  const response = await fetch(`${fx.base}/graphql`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    body: JSON.stringify({ query, variables }),
  });
  const body = await response.json();
  if (body.errors) throw new Error(`API: ${JSON.stringify(body.errors)}`);
  return body.data;
}

const balanceOf = async (id) =>
  (await api(fx.ownerToken, 'query($id: ID!) { workspace(id: $id) { balance available } }', { id })).workspace;

function isLocal(url) {
  const u = new URL(url);
  return ['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname) || ['data:', 'blob:', 'about:'].includes(u.protocol);
}

async function newContext(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 }, deviceScaleFactor: 1 });
  await context.route('**/*', (route) => {
    const url = route.request().url();
    if (isLocal(url)) return route.continue();
    external.push(url);
    return route.abort('internetdisconnected');
  });
  context.on('page', (page) => watch(page));
  return context;
}

function watch(page) {
  page.on('websocket', (ws) => !isLocal(ws.url()) && external.push(ws.url()));
  page.on('pageerror', (e) => console.log(`  page error: ${e.message}`));
  const debug = Boolean(process.env.RESERVOIR_BROWSER_DEBUG);
  page.on('console', (m) => (debug || m.type() === 'error') && console.log(`  console ${m.type()}: ${m.text()}`));
  if (debug) {
    page.on('websocket', (ws) => {
      console.log(`  ws open ${ws.url()}`);
      ws.on('framesent', (f) => console.log(`  ws > ${String(f.payload).slice(0, 200)}`));
      ws.on('framereceived', (f) => console.log(`  ws < ${String(f.payload).slice(0, 200)}`));
      ws.on('close', () => console.log('  ws closed'));
    });
  }
}

async function shot(page, name) {
  if (!fx.screenshots) return;
  await page.waitForTimeout(300);
  await page.screenshot({ path: `${fx.screenshots}/${name}.png`, fullPage: true });
}

const balanceText = (page, sel) => page.locator(sel).first().getAttribute('data-exact');

async function waitLive(page) {
  await page.locator('[data-testid=live-dot].live').waitFor({ timeout: 10_000 });
}

async function waitExact(page, selector, expected, timeout) {
  await page.waitForFunction(
    ([sel, want]) => document.querySelector(sel)?.getAttribute('data-exact') === want,
    [selector, expected],
    { timeout },
  );
}

const debit = (requestId, promptTokens) =>
  api(fx.ownerToken, `mutation($input: RecordUsageInput!) { recordUsage(input: $input) { cost } }`, {
    input: { workspaceId: fx.production, projectTag: 'search', modelId: 'openai/gpt-4o-mini', promptTokens, completionTokens: 0, requestId },
  });

export { fx, api, assert, balanceOf, check, debit, newContext, shot, waitExact, waitLive, balanceText, results, external };

