// A node:test reporter that prints only the closing line `N passed, M failed`
// (used beside the spec reporter; suites are not counted, only tests).
export default async function* summary(source) {
  let passed = 0;
  let failed = 0;
  let skipped = 0;
  for await (const event of source) {
    if (event.type !== "test:pass" && event.type !== "test:fail") continue;
    const { data } = event;
    if (data.details && data.details.type === "suite") continue;
    if (event.type === "test:fail") failed += 1;
    else if (data.skip || data.todo) skipped += 1;
    else passed += 1;
  }
  yield `${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ""}\n`;
}
