// A viewer and a member (no money buttons), a bad token (signed out with a message), and
// GraphiQL with no network.
import { assert, check, fx, newContext, shot } from './lib.mjs';

const MONEY_BUTTONS = ['package', 'buy-custom', 'transfer-submit', 'reload-save', 'alerts-save', 'card-add'];

async function noMoneyButtons(browser, token, role) {
  const context = await newContext(browser);
  const page = await context.newPage();
  await check(`a ${role} sees the workspace but no money buttons`, async () => {
    await page.goto(`${fx.base}/dashboard#token=${token}`);
    await page.locator('[data-testid=workspace-row]').first().waitFor({ timeout: 10_000 });
    const rows = await page.locator('[data-testid=workspace-row]').count();
    assert(rows === 1, `a ${role} of Production only sees ${rows} workspaces`);
    await page.goto(`${fx.base}/dashboard#/w/${fx.production}/money`);
    await page.locator('[data-testid=read-only]').waitFor({ timeout: 10_000 });
    await page.locator('[data-testid=auto-reload]').waitFor();
    for (const id of MONEY_BUTTONS) {
      const n = await page.locator(`[data-testid=${id}]`).count();
      assert(n === 0, `a ${role} sees ${n} [${id}]`);
    }
    assert((await page.locator('[data-testid=cards]').count()) === 0, `a ${role} sees the stored cards`);
  });
  if (role === 'viewer') await shot(page, 'dashboard-viewer');
  await context.close();
}

async function badToken(browser) {
  const context = await newContext(browser);
  const page = await context.newPage();
  await check('an invalid or expired token signs out with a message', async () => {
    await page.goto(`${fx.base}/dashboard#token=rsv_u_${'x'.repeat(43)}`);
    const message = page.locator('[data-testid=signed-out]');
    await message.waitFor({ timeout: 10_000 });
    const text = await message.textContent();
    assert(text.includes('Sign in again') && text.includes('UNAUTHENTICATED'), `message: ${text}`);
    assert((await page.evaluate(() => sessionStorage.getItem('reservoir.token'))) === null, 'the bad token was kept');
    await page.locator('[data-testid=token-input]').waitFor();
  });
  await context.close();
}

async function graphiql(browser) {
  const context = await newContext(browser);
  await context.addInitScript((token) => {
    try {
      localStorage.setItem('graphiql:headers', JSON.stringify({ Authorization: `Bearer ${token}` }));
    } catch {
      // about:blank has no storage
    }
  }, fx.ownerToken);
  const page = await context.newPage();
  await check('GraphiQL loads and runs a query with the network off (every asset from the binary)', async () => {
    await page.goto(`${fx.base}/`);
    await page.locator('.graphiql-container').waitFor({ timeout: 15_000 });
    await page.locator('.graphiql-execute-button').click();
    await page.waitForFunction(() => document.querySelector('.result-window')?.textContent.includes('Acme Labs'), null, { timeout: 10_000 });
  });
  await shot(page, 'graphiql');
  await context.close();
}

export async function otherChecks(browser) {
  await noMoneyButtons(browser, fx.viewerToken, 'viewer');
  await noMoneyButtons(browser, fx.memberToken, 'member');
  await badToken(browser);
  await graphiql(browser);
}
