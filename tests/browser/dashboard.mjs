// Browser checks of the billing dashboard and GraphiQL, run by
// tests/tests/dashboard_browser.rs with RESERVOIR_BROWSER_FIXTURE (JSON: base URL, ids, tokens).
// Debian's chromium only: playwright-core never downloads a browser. Every request that
// would leave localhost is recorded and aborted; any is a failure.
import { chromium } from 'playwright-core';
import { assert, check, external, fx, results } from './lib.mjs';
import { ownerChecks } from './owner.mjs';
import { otherChecks } from './others.mjs';

const LAUNCH_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update'];

async function main() {
  const browser = await chromium.launch({ executablePath: process.env.RESERVOIR_CHROMIUM ?? '/usr/bin/chromium', args: LAUNCH_ARGS });
  try {
    await ownerChecks(browser);
    await otherChecks(browser);
  } finally {
    await browser.close();
  }
  await check('no request left localhost', () => assert(external.length === 0, `external requests: ${external.join(', ')}`));
  const failed = results.filter((r) => !r.ok).length;
  console.log(`\n${results.length - failed} passed, ${failed} failed (browser checks, ${fx.backend})`);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.log(`FAILED to run: ${e?.stack ?? e}`);
  process.exit(1);
});
