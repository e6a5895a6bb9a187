// Lint a README with awesome-lint's rules and print the messages as JSON lines.
// Usage: node awesome_lint.mjs <dir holding node_modules/awesome-lint> <README path>
// The awesome-github rule is left out: it asks the GitHub API about the repository,
// and tests never touch the network. Every other rule runs as `npx awesome-lint` runs it.
import path from 'node:path';
import {pathToFileURL} from 'node:url';

const [installDir, readme] = process.argv.slice(2);
const load = file => import(pathToFileURL(path.join(installDir, 'node_modules', 'awesome-lint', file)).href);

const {createConfig} = await load('config.js');
const {createRules} = await load('rules/index.js');
const {default: lint} = await load('index.js');

const offline = createRules().filter(([rule]) => rule.name !== 'remark-lint:awesome-github');
const files = await lint({filename: path.resolve(readme), config: createConfig(offline)});
for (const file of files) {
	for (const m of file.messages) {
		console.log(JSON.stringify({file: path.basename(file.path), line: m.line, rule: m.ruleId, reason: m.reason}));
	}
}
