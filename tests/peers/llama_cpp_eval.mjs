// Greedy continuation of a prompt by llama.cpp (node-llama-cpp), with each step's probabilities
// of the most likely tokens: {"prompt": [...], "steps": [{"token": t, "top": [[t, p], ...]}]}
import {getLlama} from "node-llama-cpp";
const [modelPath, prompt, n] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
// An f32 KV cache and no flash attention: the comparison is with f32 transformers.
const context = await model.createContext({
  contextSize: 64, batchSize: 64, threads: 1, flashAttention: false,
  experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32",
});
const sequence = context.getSequence();
const tokens = model.tokenize(prompt, false);
const steps = [];
for await (const out of sequence.evaluateWithMetadata(tokens, {probabilities: true}, {temperature: 0})) {
  const top = [...out.probabilities.entries()].sort((a, b) => b[1] - a[1]).slice(0, 5);
  steps.push({token: out.token, top});
  if (steps.length >= Number(n)) break;
}
console.log(JSON.stringify({prompt: Array.from(tokens), steps}));
process.exit(0);
