// The account owner's session: sign-in by link, the account view, a live debit, buying a
// package, auto-reload, an error in words, history, and catching up after a dropped socket.
import { api, assert, balanceOf, check, debit, fx, newContext, shot, waitExact, waitLive } from './lib.mjs';

const nanos = (credits) => {
  const [w, f = ''] = credits.replace('-', '').split('.');
  const n = BigInt(w) * 1_000_000_000n + BigInt((f + '000000000').slice(0, 9));
  return credits.startsWith('-') ? -n : n;
};

async function signInByLink(page) {
  await check('sign in by link (#token=…), token kept in sessionStorage only', async () => {
    await page.goto(`${fx.base}/dashboard#token=${fx.ownerToken}`);
    await page.locator('[data-testid=account]').waitFor({ timeout: 10_000 });
    assert(!page.url().includes(fx.ownerToken), `the token is still in the URL: ${page.url()}`);
    const stored = await page.evaluate(() => [sessionStorage.getItem('reservoir.token'), JSON.stringify(localStorage)]);
    assert(stored[0] === fx.ownerToken, 'the token is not in sessionStorage');
    assert(!stored[1].includes(fx.ownerToken), 'the token leaked into localStorage');
    assert((await page.locator('[data-testid=who]').textContent()).includes('Ada Lovelace'), 'the user name is not shown');
  });
}

async function moneyFormat(page) {
  await check('money is shown as $1,234.56 (exact, BigInt rounding), exact amount on hover', async () => {
    const got = await page.evaluate(async () => {
      const f = await import('/dashboard/assets/app/format.js');
      const cases = ['1234.5', '0', '-12.345', '0.004999999', '0.005', '1234567.891', '-0.001', '999.995'];
      return { dollars: cases.map(f.dollars), exact: f.exact('12.500000001'), parsed: ['$1,000.5', '12.345', 'x'].map(f.parseAmount) };
    });
    const want = ['$1,234.50', '$0.00', '−$12.35', '$0.00', '$0.01', '$1,234,567.89', '$0.00', '$1,000.00'];
    assert(JSON.stringify(got.dollars) === JSON.stringify(want), `dollars: ${JSON.stringify(got.dollars)}`);
    assert(got.exact === '12.500000001 credits (exact)', `exact: ${got.exact}`);
    assert(JSON.stringify(got.parsed) === JSON.stringify(['1000.5', null, null]), `parsed: ${JSON.stringify(got.parsed)}`);
    const title = await page.locator(`[data-workspace="${fx.production}"] [data-testid=balance-value]`).getAttribute('title');
    assert(/^-?\d+(\.\d+)? credits \(exact\)$/.test(title), `hover: ${title}`);
  });
}

async function accountView(page) {
  await check('the account view lists the workspaces with balance, reserved, available and the total', async () => {
    const rows = page.locator('[data-testid=workspace-row]');
    await rows.nth(1).waitFor();
    const names = await rows.locator('td:first-child').allTextContents();
    assert(JSON.stringify(names) === JSON.stringify(['Production', 'Staging']), `workspaces: ${names}`);
    const prod = await balanceOf(fx.production);
    await waitExact(page, `[data-workspace="${fx.production}"] [data-testid=balance-value]`, prod.balance, 5_000);
    const shown = await page.locator(`[data-workspace="${fx.production}"] [data-testid=balance-value]`).textContent();
    assert(/^\$[\d,]+\.\d\d$/.test(shown), `money format: ${shown}`);
    const total = await page.locator('[data-testid=account-total] .money').textContent();
    assert(/^\$[\d,]+\.\d\d$/.test(total), `total: ${total}`);
  });
  await waitLive(page);
  await shot(page, 'dashboard-account');
}

async function liveDebit(page) {
  await check('a debit recorded through the API changes the balance on screen within 1 s, without a reload', async () => {
    await waitLive(page);
    await page.evaluate(() => (window.__sameDocument = true));
    const sel = `[data-workspace="${fx.production}"] [data-testid=balance-value]`;
    const sent = Date.now();
    await debit(`browser-live-${Date.now()}`, 2_000_000);
    const after = await balanceOf(fx.production);
    await waitExact(page, sel, after.balance, 1_000 - (Date.now() - sent));
    const elapsed = Date.now() - sent;
    assert(elapsed <= 1_000, `took ${elapsed} ms`);
    assert(await page.evaluate(() => window.__sameDocument === true), 'the page was reloaded');
    console.log(`  balance updated ${elapsed} ms after the debit`);
  });
}

async function overview(page) {
  await check('the workspace view shows spend, depletion, the chart, breakdowns, budgets and members', async () => {
    await page.goto(`${fx.base}/dashboard#/w/${fx.production}`);
    await page.locator('[data-testid=spend-chart] canvas').waitFor({ timeout: 10_000 });
    for (const id of ['by-project', 'by-member', 'by-model', 'budgets', 'members']) await page.locator(`[data-testid=${id}] table`).waitFor();
    const avg = await page.locator('[data-testid=avg-spend]').textContent();
    assert(/^\$[\d,]+\.\d\d$/.test(avg) && avg !== '$0.00', `average daily spend: ${avg}`);
    assert(!(await page.locator('[data-testid=depletion]').textContent()).includes('No recent'), 'no depletion date');
    const members = await page.locator('[data-testid=by-member] tbody tr').count();
    assert(members === 2, `usage by member rows: ${members}`);
    const roles = await page.locator('[data-testid=member-row]').allTextContents();
    assert(roles.length === 3 && roles[0].includes('Ada Lovelace') && roles[0].includes('account owner'), `members: ${roles}`);
    await waitLive(page);
  });
  await shot(page, 'dashboard-workspace');
}

async function buyPackage(page) {
  await check('buying a package shows its bonus, the purchase progress and the credited balance', async () => {
    const members = await api(fx.ownerToken, 'query($id: ID!) { workspace(id: $id) { members { user { id } } } }', { id: fx.production });
    const recipientIds = members.workspace.members.map((m) => m.user.id);
    await api(fx.ownerToken, 'mutation($input: SetAlertThresholdsInput!) { setAlertThresholds(input: $input) { id } }', {
      input: { workspaceId: fx.production, thresholds: [{ amount: '200', severity: 'WARNING', recipientIds }, { amount: '50', severity: 'URGENT', recipientIds: recipientIds.slice(0, 1) }] },
    });
    await page.goto(`${fx.base}/dashboard#/w/${fx.production}/money`);
    await page.locator('[data-testid=card-token]').fill('tok_visa');
    await page.locator('[data-testid=card-add]').click();
    await page.locator('[data-testid=card-row]').first().waitFor({ timeout: 5_000 });
    const pkg = page.locator('[data-testid=package][data-package=pkg_100]');
    assert((await pkg.locator('[data-testid=bonus]').textContent()).includes('$15.00'), 'the package does not show its $15 bonus');
    await waitLive(page);
    const before = await balanceOf(fx.production);
    await pkg.click();
    const progress = page.locator('[data-testid=purchase-progress][data-status=SUCCEEDED]');
    await progress.waitFor({ timeout: 20_000 });
    const text = await progress.textContent();
    assert(text.includes('$100.00') && text.includes('$15.00 bonus') && text.includes('$115.00'), `progress: ${text}`);
    const expected = nanos(before.balance) + 115_000_000_000n;
    const after = await balanceOf(fx.production);
    assert(nanos(after.balance) === expected, `API balance ${after.balance}, expected +115`);
    await waitExact(page, '[data-testid=ws-balance-value]', after.balance, 3_000);
    if (fx.screenshots) await page.locator('[data-testid=buy]').screenshot({ path: `${fx.screenshots}/dashboard-purchase.png` });
  });
}

async function autoReload(page) {
  await check('toggling auto-reload persists (reload the page, and in the API)', async () => {
    await page.locator('[data-testid=reload-enabled]').check();
    await page.locator('[data-testid=reload-threshold]').fill('25');
    await page.locator('[data-testid=reload-amount]').fill('100');
    await page.locator('[data-testid=reload-save]').click();
    await page.locator('[data-testid=auto-reload][data-enabled=on]').waitFor({ timeout: 5_000 });
    await page.reload();
    await page.locator('[data-testid=auto-reload][data-enabled=on]').waitFor({ timeout: 10_000 });
    assert(await page.locator('[data-testid=reload-enabled]').isChecked(), 'the checkbox is off after a reload');
    const q = 'query($id: ID!) { workspace(id: $id) { autoReload { enabled threshold amount } } }';
    let r = (await api(fx.ownerToken, q, { id: fx.production })).workspace.autoReload;
    assert(r.enabled && r.threshold === '25' && r.amount === '100', `API: ${JSON.stringify(r)}`);
    await shot(page, 'dashboard-money');
    await page.locator('[data-testid=reload-enabled]').uncheck();
    await page.locator('[data-testid=reload-save]').click();
    await page.locator('[data-testid=auto-reload][data-enabled=off]').waitFor({ timeout: 5_000 });
    r = (await api(fx.ownerToken, q, { id: fx.production })).workspace.autoReload;
    assert(!r.enabled, 'disabling did not persist');
  });
}

async function errorInWords(page) {
  await check('a refused transfer is explained in words, with its code in small print', async () => {
    await page.goto(`${fx.base}/dashboard#/w/${fx.staging}/money`);
    await page.locator('[data-testid=transfer-amount]').fill('99999');
    await page.locator('[data-testid=transfer-submit]').click();
    const error = page.locator('[data-testid=transfer] [data-testid=error]');
    await error.waitFor({ timeout: 5_000 });
    const text = await error.textContent();
    assert((await error.getAttribute('data-code')) === 'INSUFFICIENT_CREDITS', `code: ${await error.getAttribute('data-code')}: ${text}`);
    assert(text.includes('Not enough credits') && text.includes('INSUFFICIENT_CREDITS'), `text: ${text}`);
  });
}

async function history(page) {
  await check('history: statement with running balance, purchases with invoice lines, transfers, pagination', async () => {
    await page.goto(`${fx.base}/dashboard#/w/${fx.production}/history`);
    await page.locator('[data-testid=ledger-row]').first().waitFor({ timeout: 10_000 });
    assert((await page.locator('[data-testid=ledger-row]').count()) === 20, 'a ledger page is not 20 rows');
    const first = await page.locator('[data-testid=ledger-row] td:first-child').first().textContent();
    await page.locator('[data-testid=ledger-pager] button:has-text("Older")').click();
    await page.waitForFunction((f) => document.querySelector('[data-testid=ledger-row] td')?.textContent !== f, first, { timeout: 5_000 });
    await page.locator('[data-testid=ledger-pager] button:has-text("Newer")').click();
    await page.locator('[data-testid=ledger-row]').first().waitFor();
    await shot(page, 'dashboard-history');
    await page.locator('[data-testid=history-purchases]').click();
    await page.locator('[data-testid=purchase-row]').first().waitFor({ timeout: 5_000 });
    await page.locator('[data-testid=purchase-row] details summary').first().click();
    const lines = await page.locator('[data-testid=purchase-row] details').first().textContent();
    assert(lines.includes('INV-'), `invoice lines: ${lines}`);
    await page.locator('[data-testid=history-transfers]').click();
    await page.locator('[data-testid=transfers]').waitFor({ timeout: 5_000 });
  });
}

async function reconnect(page) {
  await check('a dropped WebSocket reconnects, shows balances as stale meanwhile, and catches up', async () => {
    await page.goto(`${fx.base}/dashboard#/w/${fx.production}`);
    await waitLive(page);
    await page.evaluate(() => window.__reservoirDropSocket());
    await page.locator('[data-testid=live-dot]:not(.live)').waitFor({ timeout: 2_000 });
    await page.locator('[data-testid=ws-balance] [data-live=stale]').waitFor({ timeout: 1_000 });
    await debit(`browser-drop-${Date.now()}`, 1_000_000);
    const after = await balanceOf(fx.production);
    await waitLive(page);
    await waitExact(page, '[data-testid=ws-balance-value]', after.balance, 5_000);
    assert((await page.locator('[data-live]').first().getAttribute('data-live')) === 'live', 'still stale');
  });
}

export async function ownerChecks(browser) {
  const context = await newContext(browser);
  const page = await context.newPage();
  await signInByLink(page);
  await accountView(page);
  await moneyFormat(page);
  await liveDebit(page);
  await overview(page);
  await buyPackage(page);
  await autoReload(page);
  await errorInWords(page);
  await history(page);
  await reconnect(page);
  await context.close();
}
