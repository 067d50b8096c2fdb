// Renders an Ollama Modelfile TEMPLATE with Go's own text/template, as Ollama does.
//
//	echo '{"template": "...", "conversations": [[{"role": "user", "content": "hi"}]]}' | go run render_template.go
//
// Prints a JSON list with one rendered prompt per conversation. The data mirrors what Ollama
// passes a template: .Messages (Role, Content), plus .System and .Prompt for older templates.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	Messages []Message
	System   string
	Prompt   string
	Response string
}

func main() {
	var in struct {
		Template      string      `json:"template"`
		Conversations [][]Message `json:"conversations"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Parse(in.Template))
	out := []string{}
	for _, msgs := range in.Conversations {
		v := Values{Messages: msgs}
		systems := []string{}
		for _, m := range msgs {
			if m.Role == "system" {
				systems = append(systems, m.Content)
			}
			if m.Role == "user" {
				v.Prompt = m.Content
			}
		}
		v.System = strings.Join(systems, "\n\n") // as Ollama collates system messages
		var b strings.Builder
		if err := tmpl.Execute(&b, v); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
